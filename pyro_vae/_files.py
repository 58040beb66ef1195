"""Writing files so that a crash mid-write never leaves a half-written file behind."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Yield a temporary file beside ``path``; on success flush it to disk, rename it to
    ``path`` (atomic on POSIX) and sync the directory. Readers see the old file or the new one.

    On every failure (in the caller's writes, the flush, the sync, the close, which a full
    disk can make fail too, or the rename) the temporary file is removed and the error raised;
    an error of the file's own that names no file names ``path``."""
    path = Path(path)
    tmp = tempfile.NamedTemporaryFile(mode, dir=path.parent, prefix=f".{path.name}.", delete=False)
    try:
        try:
            yield tmp
            tmp.flush()
            # Temporary files are private (0600); the result gets the usual permissions,
            # as open() would have given it.
            os.fchmod(tmp.fileno(), 0o666 & ~_umask())
            os.fsync(tmp.fileno())
        except BaseException:
            # The first error is the one to report: a close that fails as well (the same full
            # disk, flushing what is buffered) must neither replace it nor keep the file.
            with contextlib.suppress(OSError):
                tmp.close()
            raise
        tmp.close()
        os.replace(tmp.name, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.unlink(tmp.name)
        if isinstance(error, OSError) and error.errno and error.filename is None:
            # write(), fsync() and close() name no file: say which one could not be written.
            raise OSError(error.errno, error.strerror, str(path)) from error
        raise
    # The rename lives in the directory: sync it too, so that after a power loss the new
    # name is there (not only the data behind it).
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask
