"""PCRs: SHA-384, "hash the sections, then extend once" (../shared/reference/eif.md §6).

    PCRn = SHA384(48 zero bytes ‖ SHA384(selected section data, in file order))

PCR0 = kernel ‖ cmdline ‖ every ramdisk; PCR1 = kernel ‖ cmdline ‖ ramdisk 0; PCR2 = ramdisks 1…;
PCR8 = the DER of the signing certificate. Large inputs are hashed in worker threads (hashlib
releases the GIL), so the two chains over the customer ramdisk cost one pass of wall time.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from dataclasses import dataclass

ZERO = bytes(48)
HASH_ALGORITHM = "Sha384 { ... }"  # what nitro-cli prints (the Debug text of its hasher)


def extend(content_digest: bytes) -> str:
    return hashlib.sha384(ZERO + content_digest).hexdigest()


def pcr_of(data: bytes) -> str:
    return extend(hashlib.sha384(data).digest())


@dataclass(frozen=True, slots=True)
class Measurements:
    pcr0: str
    pcr1: str
    pcr2: str
    pcr8: str | None = None

    def to_json(self) -> dict[str, str]:
        """nitro-cli's `Measurements` object (a BTreeMap: keys sorted)."""
        out = {"HashAlgorithm": HASH_ALGORITHM}
        out.update((k, v) for k, v in (("PCR0", self.pcr0), ("PCR1", self.pcr1), ("PCR2", self.pcr2),
                                        ("PCR8", self.pcr8)) if v)  # "": not measured (`Measurer(app=False)`)
        return out


class ThreadedHash:
    """A SHA-384 fed through a bounded queue by one worker thread."""

    def __init__(self, start: hashlib._Hash | None = None, depth: int = 8) -> None:
        self._hash = start if start is not None else hashlib.sha384()
        self._queue: queue.Queue[bytes | None] = queue.Queue(depth)
        self._thread = threading.Thread(target=self._run, name="sha384", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (chunk := self._queue.get()) is not None:
            self._hash.update(chunk)

    def update(self, chunk: bytes) -> None:
        self._queue.put(chunk)

    def digest(self) -> bytes:
        self.close()
        return self._hash.digest()

    def close(self) -> None:
        """End the worker (idempotent): a reader that fails half-way must not leave it waiting forever."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()


class Measurer:
    """Feeds each section's bytes to the chains that measure it, as the EIF is written. A context
    manager: leaving it ends the worker threads, whether or not `result` was reached. `app=False`
    measures PCR1 only (the chains over the application ramdisks, two SHA-384 passes over most of
    the EIF, are not run) and `result` gives "" for PCR0 and PCR2: a fetched EIF whose PCR1 is
    checked against the local blob set while PCR0 and PCR2 are taken from its record."""

    def __init__(self, app: bool = True) -> None:
        self.boot = hashlib.sha384()  # kernel ‖ cmdline ‖ ramdisk 0: small, hashed inline
        self.measure_app = app
        self.all: ThreadedHash | None = None
        self.app: ThreadedHash | None = None
        self.ramdisks = 0

    def __enter__(self) -> Measurer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for chain in (self.all, self.app):
            if chain is not None:
                chain.close()

    def start_ramdisk(self) -> None:
        self.ramdisks += 1
        if self.ramdisks == 2 and self.measure_app:
            # PCR0 continues from kernel ‖ cmdline ‖ ramdisk 0; PCR2 starts fresh
            self.all = ThreadedHash(self.boot.copy())
            self.app = ThreadedHash()

    def feed_boot(self, chunk: bytes) -> None:
        """Kernel, cmdline and ramdisk 0 (after start_ramdisk for it): in PCR0 and PCR1."""
        self.boot.update(chunk)

    def feed_ramdisk(self, chunk: bytes) -> None:
        if self.ramdisks <= 1:
            self.boot.update(chunk)
            return
        if not self.measure_app:
            return
        assert self.all is not None and self.app is not None
        self.all.update(chunk)
        self.app.update(chunk)

    def result(self, pcr8: str | None = None) -> Measurements:
        boot = self.boot.digest()
        if not self.measure_app:
            return Measurements("", extend(boot), "", pcr8)
        everything = self.all.digest() if self.all else boot
        app = self.app.digest() if self.app else hashlib.sha384().digest()
        return Measurements(extend(everything), extend(boot), extend(app), pcr8)
