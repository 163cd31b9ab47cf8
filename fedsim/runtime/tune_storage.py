"""The filesystem Tune keeps a search's experiment on: local files that are replaced whole, never left half written.

Tune (Ray 2.60) saves its experiment state into a staging folder and then copies that folder into the storage path
with ``pyarrow.fs.copy_files``, file by file and in place. A search killed during that copy (SIGKILL, a lost
node, an out-of-memory kill) left a truncated ``search_gen_state-*.json`` or ``experiment_state-*.json`` behind,
and ``Tuner.restore`` then failed (``EOFError`` in Tune's searcher restore, then "no search space has been
defined"). Through :func:`replacing_local_filesystem` every file Tune writes goes to a temporary name in its
folder and is renamed over the target (``os.replace``) only once it is closed after a complete write, so a kill
leaves each file either as it was or as it was meant to be. (A rename survives a killed process, not a power
loss: the data is not fsynced.) fsspec's own deferred commit (``open(..., autocommit=False)``) is no substitute: it
writes to the system temporary folder and ``shutil.move``s the file over, a copy when that is another filesystem.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

import fsspec.implementations.local
import pyarrow
import pyarrow.fs

PARTIAL_SUFFIX = ".part"
PARTIAL_GLOB = f".*{PARTIAL_SUFFIX}"  # the hidden temporary files of writes not closed yet (or killed)


class _ReplaceOnClose:
    """A binary file object for ``path`` that writes to a temporary file in the same folder and replaces ``path``
    with it on :meth:`close`. A write that raised makes :meth:`close` drop the temporary file instead, so a failed
    copy (disk full) does not replace a good file with part of a new one."""

    def __init__(self, path: str) -> None:
        self.path = path
        folder = os.path.dirname(path) or "."
        os.makedirs(folder, exist_ok=True)
        self._tmp = os.path.join(folder, f".{os.path.basename(path)}.{secrets.token_hex(6)}{PARTIAL_SUFFIX}")
        # O_EXCL: a fresh file; mode 0o666 less the umask, as a plain open gives (mkstemp's 0o600 would not)
        self._file = os.fdopen(os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb")
        self._failed = False

    @property
    def closed(self) -> bool:
        return self._file.closed

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False

    def tell(self) -> int:
        return self._file.tell()

    def write(self, data: Any) -> int:
        try:
            return self._file.write(data)
        except BaseException:
            self._failed = True
            raise

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        if self._file.closed:
            return
        try:
            self._file.close()
        except BaseException:
            self._failed = True
            raise
        finally:
            if self._failed:
                os.unlink(self._tmp)
            else:
                os.replace(self._tmp, self.path)


class ReplacingLocalHandler(pyarrow.fs.FSSpecHandler):
    """pyarrow's handler over fsspec's local filesystem, except that output streams replace their file on close
    (:class:`_ReplaceOnClose`). Appends are not offered (Tune does not append to storage): they raise
    ``NotImplementedError``. Picklable: Tune sends the filesystem to its trial actors."""

    def __init__(self) -> None:
        super().__init__(fsspec.implementations.local.LocalFileSystem(auto_mkdir=True))

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self)

    def __hash__(self) -> int:
        return hash(type(self))

    def get_type_name(self) -> str:
        return "fedsim-replacing-local"

    def open_output_stream(self, path: str, metadata: Any) -> pyarrow.NativeFile:
        return pyarrow.PythonFile(_ReplaceOnClose(path), mode="w")

    def open_append_stream(self, path: str, metadata: Any) -> pyarrow.NativeFile:
        raise NotImplementedError(f"appending to {path}: the experiment's files are replaced whole, not appended to")


def replacing_local_filesystem() -> pyarrow.fs.PyFileSystem:
    """The local filesystem for ``tune.RunConfig(storage_filesystem=...)`` / ``Tuner.restore`` /
    ``Tuner.can_restore``: paths are absolute local paths; every file written is replaced whole on close."""
    return pyarrow.fs.PyFileSystem(ReplacingLocalHandler())


def drop_partial_writes(folder: str | os.PathLike[str]) -> int:
    """Delete the temporary files of writes a kill interrupted anywhere under ``folder`` (hidden ``*.part`` files
    :class:`_ReplaceOnClose` names); returns how many. Their targets were never replaced, so nothing is lost."""
    dropped = 0
    for path in Path(folder).rglob(PARTIAL_GLOB):
        if path.is_file():
            path.unlink()
            dropped += 1
    return dropped
