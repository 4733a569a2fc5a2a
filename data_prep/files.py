"""Folders that appear whole or not at all."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from data_prep.errors import SpeechRNNError


@contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """Fill a hidden temporary folder beside ``out``; rename it to ``out`` only if the block succeeds.

    On any failure (or a kill) the temporary folder is removed or stays hidden, so ``out`` never
    exists half-made. ``out`` must be absent or empty (callers check first, with their own message).
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent)).resolve()
    try:
        yield tmp
        try:
            if out.is_dir():
                out.rmdir()  # empty when the caller checked; fails loudly if someone filled it meanwhile
            os.rename(tmp, out)
        except OSError as exc:
            raise SpeechRNNError(f"cannot move the finished folder into place ({exc.strerror or exc}); "
                                 "it must be absent or empty", out) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
