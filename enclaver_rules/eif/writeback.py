"""Start the disk's writeback while the EIF is still being written, so the final fsync is short.

The EIF is fsynced before it is renamed into place (`atomic_file`). Left alone, the kernel holds
most of a 1 GiB EIF as dirty pages and the fsync then waits for all of it, after the hashing is
done: on a disk slower than the hashing, the build costs hashing + writing. A thread here calls
`fdatasync` each time another `every` bytes were written, so the disk writes while the build
hashes, and the last fsync waits for one step's bytes only. On tmpfs fdatasync costs nothing.

fdatasync's errors are kept and raised by `close`: Linux reports a writeback error to one fsync
only, so one swallowed here would let the final fsync succeed on a file that is not on the disk.
A file that cannot be synced at all (EINVAL: a pipe, some special files) is left to the caller.
"""

from __future__ import annotations

import errno
import os
import threading

EVERY = 64 << 20


class Writeback:
    """Told how many bytes were written (`wrote`), syncs `fd` in the background every `every` bytes."""

    def __init__(self, fd: int, every: int = EVERY) -> None:
        self._fd = fd
        self._every = every
        self._pending = 0
        self._wake = threading.Event()
        self._stop = False
        self._due = False  # a sync was asked for and not started yet
        self.error: OSError | None = None
        self._thread = threading.Thread(target=self._run, name="eif-writeback", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            if self._due:
                self._due = False
                try:
                    os.fdatasync(self._fd)
                except OSError as e:
                    if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.EROFS):
                        self.error = e
                    return
            if self._stop:
                return

    def wrote(self, n: int) -> None:
        self._pending += n
        if self._pending >= self._every:
            self._pending = 0
            self._due = True
            self._wake.set()

    def close(self) -> None:
        """Stop the thread (a sync asked for is done first); raises a sync's error."""
        self._stop = True
        self._wake.set()
        self._thread.join()
        if self.error is not None:
            raise self.error
