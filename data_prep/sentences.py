"""Everyday sentences that contain no command: running speech for training negatives and for
measuring false alarms per hour of ordinary talk.

A keyword spotter left on in a room hears people talk far more than it hears commands. Wake-word
engines train on hours of such speech as negatives and publish false alarms per hour of it. The
sentences here are drawn from a small grammar of statements and questions (five to twelve words)
whose word banks hold none of the ten commands, none of their inflections (goes, stopped, ...),
and none of their homophones (know, write, ...): no model could be blamed for firing on those.

The grammar has two disjoint parts: ``train`` (10 templates, every other word of each bank) for
training negatives, and ``heldout`` (5 other templates, the other words) for measuring, so a false
alarm figure is not flattered by sentences the model learnt to ignore.
"""

from __future__ import annotations

import re

import numpy as np

from data_prep.errors import SpeechRNNError

COMMANDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
# Words a sentence must not hold: the commands, their inflections and compounds, their homophones.
FORBIDDEN = re.compile(
    r"\b(yes|no|up\w*|down\w*|left\w*|right\w*|on|off\w*|stop\w*|go|goes|going|gone|know\w*|write|rite|"
    r"wright|nope|yeah|yep|okay|ok|alright|upon|onto)\b", re.I)

PEOPLE = ["my sister", "my brother", "our neighbour", "the teacher", "your friend", "the doctor", "my father",
          "her mother", "the manager", "a student", "the children", "our cousin", "the driver", "my uncle",
          "the baker", "his aunt", "the new nurse", "a farmer", "the old man", "my colleague"]
SUBJECTS = ["I", "we", "they", "she", "he", "you"] + PEOPLE
NOUNS = ["report", "garden", "kitchen", "letter", "window", "bicycle", "library", "sandwich", "camera", "jacket",
         "picture", "ticket", "basket", "bottle", "blanket", "bridge", "museum", "market", "recipe", "song",
         "movie", "newspaper", "pencil", "umbrella", "lamp", "table", "chair", "book", "phone", "kettle",
         "parcel", "meeting", "holiday", "lesson", "painting", "puzzle", "envelope", "carpet", "shelf", "mirror"]
PLURALS = ["apples", "books", "letters", "chairs", "photos", "candles", "tickets", "flowers", "cookies", "plates",
           "shirts", "pencils", "stamps", "eggs", "boxes", "keys", "coins", "bottles", "songs", "lemons"]
ADJECTIVES = ["small", "quiet", "heavy", "bright", "old", "new", "warm", "cold", "clean", "busy", "empty",
              "lovely", "strange", "simple", "famous", "green", "yellow", "broken", "careful", "gentle"]
PAST_VERBS = ["bought", "painted", "cleaned", "found", "carried", "borrowed", "visited", "fixed", "opened",
              "finished", "cooked", "moved", "washed", "brought", "sold", "watched", "read", "built", "wrapped",
              "ordered"]
BASE_VERBS = ["buy", "paint", "clean", "find", "carry", "borrow", "visit", "fix", "open", "finish", "cook",
              "move", "wash", "bring", "sell", "watch", "read", "build", "wrap", "order"]
PLACES = ["in the kitchen", "at the station", "near the river", "behind the school", "at the market",
          "in the garden", "at the library", "by the window", "in the village", "at the bakery", "in the office",
          "near the park", "at the museum", "in the hallway", "at the harbour"]
TIMES = ["yesterday", "this morning", "last week", "after lunch", "every Sunday", "before dinner", "tonight",
         "tomorrow", "in the evening", "at noon", "last summer", "next Friday", "this afternoon", "later today"]
EVENTS = ["the rain starts", "the shops close", "the guests arrive", "the train leaves", "it gets dark",
          "the film begins", "lunch is ready", "the bell rings", "winter comes", "the meeting ends"]
DEGREES = ["very", "quite", "rather", "really", "a little", "far too", "surprisingly"]
QUESTION_STARTS = ["did", "will", "could", "should", "would", "can"]

TEMPLATES = [
    "{subject} {past} the {adj} {noun} {place} {time}.",
    "{qstart} {person} {verb} the {noun} {place}?",
    "I think the {noun} is {degree} {adj} {time}.",
    "we should {verb} the {noun} before {event}.",
    "{person} said that the {noun} was {degree} {adj}.",
    "could you {verb} the {adj} {noun} for me {time}?",
    "there is a {adj} {noun} {place}.",
    "{person} {past} a {noun} {time}.",
    "how many {plural} did {person} {verb} {time}?",
    "the {noun} {place} looks {degree} {adj} today.",
    "why did {person} {verb} the {noun} {time}?",
    "{subject} always {verb_s} {plural} {place}.",
    "where did you put the {adj} {noun}?",
    "{person} and I {past} some {plural} {time}.",
    "it was a {degree} {adj} day {place}.",
]


PARTS = ("train", "heldout")


def _half(bank: list[str], part: str) -> list[str]:
    return bank[PARTS.index(part) :: 2]


def _fill(template: str, rng: np.random.Generator, part: str) -> str:
    pick = lambda bank: (half := _half(bank, part))[int(rng.integers(len(half)))]  # noqa: E731
    verb = int(rng.integers(len(BASE_VERBS) // 2)) * 2 + PARTS.index(part)
    base = BASE_VERBS[verb]
    verb_s = base + ("es" if base.endswith(("sh", "ch", "x")) else "s")
    text = template.format(
        subject=pick(SUBJECTS), person=pick(PEOPLE), past=PAST_VERBS[verb], verb=base, verb_s=verb_s,
        adj=pick(ADJECTIVES), noun=pick(NOUNS), plural=pick(PLURALS), place=pick(PLACES), time=pick(TIMES),
        event=pick(EVENTS), degree=pick(DEGREES), qstart=pick(QUESTION_STARTS))
    return text[0].upper() + text[1:]


def no_command_sentences(count: int, seed: int, part: str = "train", min_words: int = 5,
                         max_words: int = 12) -> list[str]:
    """``count`` distinct sentences of min_words..max_words words with no command word in them,
    from one part of the grammar ("train" or "heldout").

    Deterministic for a seed. Raises SpeechRNNError if the grammar cannot give that many.
    """
    if part not in PARTS:
        raise SpeechRNNError(f"part must be one of {', '.join(PARTS)}, not {part!r}")
    templates = TEMPLATES[:10] if part == "train" else TEMPLATES[10:]
    rng = np.random.default_rng([seed, 0x73656E74])
    out: dict[str, None] = {}
    for _ in range(count * 50):
        if len(out) >= count:
            break
        text = _fill(templates[int(rng.integers(len(templates)))], rng, part)
        n = len(text.split())
        if min_words <= n <= max_words and not FORBIDDEN.search(text):
            out[text] = None
    if len(out) < count:
        raise SpeechRNNError(f"the sentence grammar gave only {len(out)} distinct sentences, not {count}")
    return list(out)


def contains_command(text: str) -> bool:
    """True if TEXT holds a command word, an inflection or a homophone of one."""
    return bool(FORBIDDEN.search(text))
