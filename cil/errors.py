"""The two errors a user sees as one line (``cil: error: ...``) instead of a traceback.

``ConfigError``: the configuration cannot run (a key, value, file or setting named with what would be valid),
raised before any data is loaded where possible; ``cil`` exits with status 2. ``DataError``: the data turned out
bad while the run was going (an unreadable image, say), named by file; ``cil`` exits with status 1.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration the framework cannot run: the message names the key, the value and what is valid."""


class DataError(RuntimeError):
    """Bad data found mid-run: the message names the file and what to do about it."""
