"""File I/O with guarantees: atomic writes (every result, table, plot and checkpoint the project writes goes through
:func:`atomic_write`) and safe reads of files made elsewhere (:func:`safe_unpickle` for the data formats that are
pickles; checkpoints and tensors are read with ``torch.load(weights_only=True)`` where they are read)."""

from __future__ import annotations

import errno
import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

from cil.errors import DataError

# what a pickled data set (CIFAR's python batches) may hold besides dicts, lists, tuples, strings, bytes and
# numbers: numpy arrays and their dtypes, as numpy 1 and numpy 2 name them, and the codec call protocol 2 uses to
# rebuild bytes. Nothing here runs code.
NUMPY_ARRAY_GLOBALS = frozenset(
    {
        ("_codecs", "encode"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }
)


class UnsafePickle(pickle.UnpicklingError):
    """A pickle that names a class or function outside the allowed ones (it would run code when loaded)."""

    def __init__(self, module: str, name: str):
        super().__init__(f"it names {module}.{name}, which a data file has no reason to hold")
        self.module, self.name = module, name


class _Restricted(pickle.Unpickler):
    def __init__(self, file: BinaryIO, allowed: frozenset, **kwargs: Any):
        super().__init__(file, **kwargs)
        self.allowed = allowed

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.allowed:
            raise UnsafePickle(module, name)
        return super().find_class(module, name)


def safe_unpickle(path: str | Path, allowed: frozenset = NUMPY_ARRAY_GLOBALS, encoding: str = "latin1") -> Any:
    """``pickle.load`` of ``path`` that builds only plain containers, strings, bytes, numbers and the ``allowed``
    globals (numpy arrays by default) and raises :class:`UnsafePickle` for anything else, before it runs."""
    with open(path, "rb") as f:
        return _Restricted(f, allowed, encoding=encoding).load()


def atomic_write(path: str | Path, data: str | bytes | Callable[[Path], None]) -> Path:
    """Write ``data`` (text, bytes, or a function that writes a given path) to a temporary file in the same
    folder, then rename it over ``path``: readers see the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=path.suffix)
    os.close(fd)
    try:
        if callable(data):
            data(Path(tmp))
        else:
            Path(tmp).write_bytes(data.encode() if isinstance(data, str) else data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would make results private: follow the umask
        _fsync(tmp)  # the bytes are on disk before the name points at them ...
        os.replace(tmp, path)
        _fsync(path.parent)  # ... and the new name is too: a crash or power loss keeps the old file or the new one
    except Exception as e:
        if _disk_full(e):
            raise DataError(
                f"cannot write {path}: no space left on the device of {path.parent} ({_free(path.parent)} free); "
                "free space there and resume (cil run --resume): the previous file is intact"
            ) from None
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _fsync(path: str | Path) -> None:
    """``fsync`` of a file, or of a folder (its entries), as databases do before they call a write done."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot sync a folder; the file itself was synced
        pass
    finally:
        os.close(fd)


def _disk_full(error: BaseException) -> bool:
    """A full disk, as the OS reports it or as torch.save's zip writer words it."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(error).lower()
    return "no space left" in text or ("file write failed" in text and "inline_container" in text)


def _free(folder: Path) -> str:
    try:
        return f"{shutil.disk_usage(folder).free / 2**20:.0f} MB"
    except OSError:
        return "unknown"


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask
