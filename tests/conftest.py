"""Shared fixtures: the real recordings in ../shared, small subsets of them, temp caches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "speech_commands"

# Keep test caches out of the user's home; numba's compile cache is shared across runs.
os.environ.setdefault("NUMBA_CACHE_DIR", str(REPO / ".cache" / "numba"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# The Kokoro model and voicepacks (`make kokoro`, i.e. `speechrnn data get-kokoro`, puts them in the
# checkout's cache); pinned here because tests point SPEECHRNN_CACHE at temporary folders.
os.environ.setdefault("SPEECHRNN_KOKORO", str(Path(os.environ.get("SPEECHRNN_CACHE") or REPO / ".cache" / "speechrnn")
                                              / "kokoro"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "README.md").exists():
        pytest.fail(f"the real recordings are missing: expected {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def kokoro_folder() -> Path:
    from data_prep.errors import SpeechRNNError
    from data_prep.kokoro import check_installed

    try:
        return check_installed(os.environ["SPEECHRNN_KOKORO"])
    except SpeechRNNError as err:
        pytest.fail(f"{err} (`make kokoro` does it for the tests)")


@pytest.fixture(scope="session")
def litert_model() -> Path:
    """A well-trained 12-class export with LiteRT models (float32 and int8): models/default."""
    shipped = REPO / "models" / "default"
    meta = json.loads((shipped / "assets" / "speechrnn.json").read_text())
    if "int8" not in meta.get("litert", {}):
        pytest.fail(f"{shipped} has no int8 LiteRT model: export it again (make default-model)")
    return shipped


@pytest.fixture()
def cache_dir(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "cache"
    monkeypatch.setenv("SPEECHRNN_CACHE", str(path))
    return path


def run_cli(*args: str, env: dict | None = None, timeout: float = 600, input: bytes | None = None):
    """Run the real `speechrnn` console entry point in a subprocess."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-c", "from speechrnn.cli import main; main()", *args],
        capture_output=True, text=True, env=full_env, timeout=timeout, input=input,
    )
