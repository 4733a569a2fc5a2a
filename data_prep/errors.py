"""The one exception type for problems a user can cause (bad files, bad folders, bad options)."""

from __future__ import annotations

import os


class SpeechRNNError(Exception):
    """A problem the user can fix. The message names the file (where there is one) and the fix.

    The CLI prints it as ``error: <message>`` on stderr; it never becomes a traceback.
    """

    def __init__(self, message: str, path: str | os.PathLike | None = None):
        self.path = None if path is None else os.fspath(path)
        self.reason = message
        super().__init__(message if path is None else f"{self.path}: {message}")
