"""Big result bodies kept in a temporary file instead of memory, discord-free.

A generated image past :data:`SPOOL_BYTES` is written to a :class:`ResultFile` as it arrives
from the API (:mod:`kontext.segmind`), fitted without being read back when it already fits
(:func:`kontext.images.fit_to_limit`), and uploaded from the file (``cogs/sinks.py``): with 50
jobs in flight, the bot holds a few hundred KiB of each big result instead of all of it.

The file is an unnamed temporary file (``tempfile.TemporaryFile``: on Linux ``O_TMPFILE``, or
created and unlinked at once), so nothing is left on disk even when the process is killed; its
descriptor is released by :meth:`ResultFile.close`, which the job pipeline calls when the job
ends, whatever the end (posted, refunded, cancelled). :func:`open_count` counts the files not
closed yet, for tests and metrics.
"""

from __future__ import annotations

import tempfile
import threading
from typing import IO, Any

__all__ = ["HEAD_BYTES", "SPOOL_BYTES", "SPOOL_DIR", "ResultFile", "open_count"]

SPOOL_BYTES = 1024 * 1024
"""A result body longer than this is spooled to a temporary file; shorter ones stay ``bytes``."""

SPOOL_DIR: str | None = None
"""Where the temporary files are made (None: :func:`tempfile.gettempdir`, i.e. ``$TMPDIR``)."""

HEAD_BYTES = 64 * 1024
"""The first bytes of a spooled body kept in memory: format sniffing, header sizes, JSON."""

_TAIL_BYTES = 64

_lock = threading.Lock()
_open = 0


def open_count() -> int:
    """How many :class:`ResultFile` objects of this process are not closed yet."""
    return _open


class ResultFile:
    """A body written once, in order, to an unnamed temporary file, then read any number of times.

    ``size`` counts the bytes written; ``head`` holds the first :data:`HEAD_BYTES` of them and
    ``tail`` the last 64 (the magic-byte and completeness checks need nothing else). Not
    thread-safe while being written; :meth:`close` is idempotent and may be called from any
    thread.
    """

    __slots__ = ("_closed", "_file", "_head", "_tail", "size")

    def __init__(self, directory: str | None = None) -> None:
        global _open
        self._file: IO[bytes] = tempfile.TemporaryFile(  # noqa: SIM115 - closed by close()
            prefix="kontext-result-", dir=directory if directory is not None else SPOOL_DIR
        )
        self._closed = False
        self._head = bytearray()
        self._tail = b""
        self.size = 0
        with _lock:
            _open += 1

    @classmethod
    def from_bytes(cls, data: bytes, directory: str | None = None) -> ResultFile:
        """A file holding ``data`` (tests, and re-encoded results past :data:`SPOOL_BYTES`)."""
        spool = cls(directory)
        try:
            spool.write(data)
        except BaseException:
            spool.close()
            raise
        return spool

    # --- writing ------------------------------------------------------------------------------

    def write(self, chunk: bytes | bytearray | memoryview) -> None:
        """Append ``chunk`` (a blocking write; the page cache takes it in microseconds)."""
        n = len(chunk)
        if not n:
            return
        self._file.write(chunk)
        if len(self._head) < HEAD_BYTES:
            self._head += chunk[: HEAD_BYTES - len(self._head)]
        if n >= _TAIL_BYTES:
            self._tail = bytes(chunk[-_TAIL_BYTES:])
        else:
            self._tail = (self._tail + bytes(chunk))[-_TAIL_BYTES:]
        self.size += n

    # --- reading ------------------------------------------------------------------------------

    @property
    def head(self) -> bytes:
        """The first :data:`HEAD_BYTES` bytes (fewer when the body is shorter)."""
        return bytes(self._head)

    @property
    def tail(self) -> bytes:
        """The last 64 bytes (fewer when the body is shorter)."""
        return self._tail

    @property
    def closed(self) -> bool:
        return self._closed

    def stream(self) -> IO[bytes]:
        """The file itself, rewound: a seekable binary stream over the whole body.

        Owned by this object (do not close it; :meth:`close` does). One reader at a time: each
        call rewinds it. Pillow's ``Image.open`` and ``discord.File`` both take it as it is.
        """
        if self._closed:
            raise ValueError("ResultFile is closed")
        self._file.flush()
        self._file.seek(0)
        return self._file

    def read_bytes(self) -> bytes:
        """The whole body in memory (only for small bodies, or JSON that must be parsed)."""
        return self.stream().read()

    # --- closing ------------------------------------------------------------------------------

    def close(self) -> None:
        """Close and forget the file (idempotent, from any thread)."""
        global _open
        with _lock:
            if self._closed:
                return
            self._closed = True
            _open -= 1
        # the class's close, not the object's: discord.File replaces ``close`` on the file
        # object it uploads with a no-op while it holds it
        type(self._file).close(self._file)

    def __enter__(self) -> ResultFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:  # a backstop only: the pipeline closes every result it gets
        if not getattr(self, "_closed", True):
            self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<ResultFile {self.size} bytes, {state}>"
