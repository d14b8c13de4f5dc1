"""The EIF writer's worker threads: order kept, errors reach the caller, nothing hangs, the
background writeback never hides a sync error. (No timing asserted: benchmarks/eif_build.py.)"""

from __future__ import annotations

import errno
import io
import os
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from enclaver_rules.eif.describe import describe
from enclaver_rules.eif.format import (
    SECTION_KERNEL,
    SECTION_RAMDISK,
    EifError,
    SectionSource,
    SerialOutput,
    read_eif,
    write_eif,
)
from enclaver_rules.eif.output import Output
from enclaver_rules.eif.pipeline import Worker
from enclaver_rules.eif.writeback import Writeback


def test_worker_keeps_order() -> None:
    seen: list[bytes] = []
    worker = Worker("test", seen.append, depth=2)
    chunks = [bytes([i]) * 3000 for i in range(50)]
    for chunk in chunks:
        worker.put(chunk)
    worker.close()
    assert seen == chunks


def test_worker_error_reaches_producer_without_blocking_it() -> None:
    def job(chunk: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    worker = Worker("test", job, depth=1)
    with pytest.raises(OSError, match="No space"):
        for _ in range(1000):  # a full queue must not block forever once the job failed
            worker.put(b"x")
    with pytest.raises(OSError, match="No space"):
        worker.close()


def test_output_crc_and_bytes_match_a_serial_write() -> None:
    chunks = [os.urandom(n) for n in (1, 548, 5000, 1 << 20, 7)]
    buffer = io.BytesIO()
    output = Output(buffer, crc=zlib.crc32(b"head"))
    for chunk in chunks:
        output.write(chunk)
    output.write(b"not in the crc", crc=False)
    output.close()
    assert buffer.getvalue() == b"".join(chunks) + b"not in the crc"
    assert output.crc == zlib.crc32(b"".join(chunks), zlib.crc32(b"head"))
    assert output.written == len(buffer.getvalue())


def test_write_eif_to_a_real_file_syncs_and_reads_back(tmp_path: Path) -> None:
    kernel, ramdisks = os.urandom(3 << 20), [os.urandom(1 << 20), os.urandom(5 << 20)]
    sections = [SectionSource(SECTION_KERNEL, len(kernel), lambda: iter([kernel]))] + [
        SectionSource(SECTION_RAMDISK, len(r), lambda r=r: iter([r[:4096], r[4096:]])) for r in ramdisks]
    path = tmp_path / "x.eif"
    with open(path, "w+b") as f:
        crc, _, size = write_eif(f, "x86_64", sections, output=Output)
    parsed = read_eif(str(path))
    assert parsed.crc_ok and parsed.crc == crc and path.stat().st_size == size


def test_write_eif_failing_write_is_raised() -> None:
    class Full(io.BytesIO):
        def write(self, data: object) -> int:
            if self.tell() > 1000:
                raise OSError(errno.ENOSPC, "No space left on device")
            return super().write(data)  # type: ignore[arg-type]

    data = os.urandom(1 << 20)
    chunks = [data[i:i + 4096] for i in range(0, len(data), 4096)]
    before = threading.active_count()
    with pytest.raises(OSError, match="No space"):
        write_eif(Full(), "x86_64", [SectionSource(SECTION_KERNEL, len(data), lambda: iter(chunks))], output=Output)
    assert threading.active_count() <= before  # the output's workers are gone, and so are the PCR chains'


def test_a_failure_inside_the_app_ramdisk_leaves_no_thread_behind(tmp_path: Path) -> None:
    """The PCR0/PCR2 chains run in threads from the second ramdisk on; a write or a read that fails
    there (a full disk, a layer that does not match its digest) must end them, or a long-lived
    process (doit building many enclaves) collects two idle threads per failure."""
    def failing() -> Iterator[bytes]:
        yield os.urandom(1 << 20)
        raise ValueError("the layer does not match its digest")

    before = {t.ident for t in threading.enumerate()}
    sections = [SectionSource(SECTION_KERNEL, 10, lambda: iter([bytes(10)])),
                SectionSource(SECTION_RAMDISK, 10, lambda: iter([bytes(10)])),
                SectionSource(SECTION_RAMDISK, 2 << 20, failing)]
    for output in (Output, SerialOutput):
        with open(tmp_path / "app.eif", "wb") as f, pytest.raises(ValueError, match="does not match"):
            write_eif(f, "x86_64", sections, output=output)
    good = tmp_path / "good.eif"
    app: list[bytes] = [bytes(1 << 20)]
    with open(good, "wb") as f:
        write_eif(f, "x86_64", [*sections[:2], SectionSource(SECTION_RAMDISK, 1 << 20, app.__iter__)])
    data = good.read_bytes()
    (tmp_path / "cut.eif").write_bytes(data[:-1000])  # ends inside the app ramdisk
    with pytest.raises(EifError):
        describe(str(tmp_path / "cut.eif"))
    left = [t.name for t in threading.enumerate() if t.ident not in before]
    assert left == [], f"threads left running: {left}"


@pytest.mark.parametrize("output", [Output, SerialOutput])
def test_section_size_mismatch_still_raises(output: type[Output] | type[SerialOutput]) -> None:
    with pytest.raises(ValueError, match="declared"):
        write_eif(io.BytesIO(), "x86_64", [SectionSource(SECTION_KERNEL, 10, lambda: iter([b"short"]))], output=output)


def test_threaded_and_serial_outputs_write_the_same_eif() -> None:
    parts = [(SECTION_KERNEL, os.urandom(70000)), (SECTION_RAMDISK, os.urandom(3 << 20)),
             (SECTION_RAMDISK, os.urandom(5 << 20))]
    results = []
    for output in (Output, SerialOutput):
        buffer = io.BytesIO()
        crc, measurements, size = write_eif(buffer, "x86_64", [
            SectionSource(k, len(d), lambda d=d: iter([d[:1000], d[1000:]])) for k, d in parts], output=output)
        results.append((buffer.getvalue(), crc, measurements, size))
    assert results[0] == results[1]


def test_writeback_keeps_a_sync_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def broken(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", broken)
    with open(tmp_path / "f", "wb") as f:
        writeback = Writeback(f.fileno(), every=10)
        writeback.wrote(100)
        with pytest.raises(OSError, match="Input/output"):
            writeback.close()


def test_writeback_on_a_pipe_gives_up_quietly() -> None:
    read, write = os.pipe()
    try:
        writeback = Writeback(write, every=1)
        writeback.wrote(1)
        writeback.wrote(1)
        writeback.close()  # fdatasync on a pipe is EINVAL: nothing to sync, not an error
    finally:
        os.close(read)
        os.close(write)
