"""The errors a user sees as one line (``cil: error: ...``) instead of a traceback.

``ConfigError``: the configuration cannot run (a key, value, file or setting named with what would be valid),
raised before any data is loaded where possible; ``cil`` exits with status 2. ``DataError``: the data turned out
bad while the run was going, named by file (``UnreadableSample``: a file that cannot be decoded); ``cil`` exits
with status 1.
"""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A configuration the framework cannot run: the message names the key, the value and what is valid."""


class DataError(RuntimeError):
    """Bad data found mid-run: the message names the file and what to do about it."""


class UnreadableSample(DataError):
    """A sample whose file cannot be read (a corrupt or truncated image, a non-image file with an image name): one
    line naming the file and what to do. Raised in a loader worker, PyTorch re-raises it in the main process with the
    worker's traceback in the message; only the last line, ours, is kept."""

    def __init__(self, message: str, path: str | None = None):
        marker = f"{type(self).__name__}: "
        if "Original Traceback" in message and marker in message:
            message = message.rsplit(marker, 1)[1].strip()
        super().__init__(message)
        self.path = path

    @classmethod
    def reading(cls, path: Any, error: BaseException, advice: str, what: str = "") -> UnreadableSample:
        """``cannot read <what><path> (<the error's first line>); <advice>``."""
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        return cls(f"cannot read {what}{printable(path)} ({reason}); {advice}", path=str(path))


def printable(path: Any) -> str:
    """A file name as one line shows it: control characters (a newline in a crawled file's name) escaped."""
    text = str(path)
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")
