"""eif/direct.py: the EIF (and a fetched file) written with O_DIRECT, or through the page cache where
O_DIRECT is not to be had; the bytes on disk are the same either way."""

from __future__ import annotations

import errno
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from enclaver_rules.eif.direct import ALIGN, BUFFER, DirectWriter, FileSink, Unsupported


def _chunks(total: int) -> list[bytes]:
    """Chunks of awkward sizes (never aligned) adding up to `total`."""
    sizes, left, i = [], total, 0
    while left:
        n = min(left, (1, 4095, 4097, 300_001, 3 << 20, 8 << 20)[i % 6] + i)
        sizes.append(n)
        left -= n
        i += 1
    data = os.urandom(total)
    out, pos = [], 0
    for n in sizes:
        out.append(data[pos:pos + n])
        pos += n
    return out


@pytest.fixture
def where(tmp_path: Path) -> Iterator[Path]:
    """A directory on a real disk: pytest's tmp_path, unless that is tmpfs, then one beside the tests."""
    probe = tmp_path / "probe"
    with open(probe, "wb") as f:
        try:
            DirectWriter(f.fileno(), 0).release()
            yield tmp_path
            return
        except Unsupported:
            pass
    here = Path(__file__).resolve().parent / f".direct-{os.getpid()}"
    here.mkdir(exist_ok=True)
    try:
        yield here
    finally:
        shutil.rmtree(here, ignore_errors=True)


@pytest.mark.parametrize("total", [0, 1, ALIGN - 1, ALIGN, BUFFER - 1, BUFFER, BUFFER + 1, 3 * BUFFER + 12345])
def test_sink_writes_exactly_the_bytes(where: Path, total: int) -> None:
    chunks = _chunks(total)
    target = where / f"out-{total}"
    with open(target, "wb") as f:
        sink = FileSink(f)
        assert sink.direct, "O_DIRECT is expected on this machine's disk (ext4); the test would prove nothing"
        for chunk in chunks:
            sink.write(chunk)
        sink.close()
        assert f.tell() == total  # the buffered file's position is the end, as after plain writes
    assert target.read_bytes() == b"".join(chunks)
    target.unlink()


def test_tmpfs_falls_back_to_the_page_cache() -> None:
    if not Path("/dev/shm").is_dir():
        pytest.fail("/dev/shm (tmpfs) is expected on Linux")
    target = Path("/dev/shm") / f"enclaver-direct-test-{os.getpid()}"
    try:
        chunks = _chunks(BUFFER + 777)
        with open(target, "wb") as f:
            sink = FileSink(f)
            assert not sink.direct  # tmpfs refuses O_DIRECT (EINVAL at open or at the probe)
            for chunk in chunks:
                sink.write(chunk)
            sink.close()
        assert target.read_bytes() == b"".join(chunks)
    finally:
        target.unlink(missing_ok=True)


def test_an_unaligned_start_falls_back_and_keeps_what_was_there(where: Path) -> None:
    target = where / "unaligned"
    with open(target, "wb") as f:
        f.write(b"head")  # the sink starts at byte 4: O_DIRECT cannot write there
        sink = FileSink(f)
        assert not sink.direct
        sink.write(b"x" * 10_000)
        sink.close()
    assert target.read_bytes() == b"head" + b"x" * 10_000
    target.unlink()


def test_a_write_error_is_raised_and_nothing_hangs(where: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = os.pwrite

    def failing(fd: int, data: memoryview, offset: int) -> int:
        calls.append(offset)
        if len(calls) == 3:  # the probe, the first buffer, then a full disk
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", failing)
    raised: list[OSError] = []

    def write_all() -> None:
        with open(where / "full", "wb") as f:
            sink = FileSink(f)
            try:
                for _ in range(40):
                    sink.write(bytes(1 << 20))
                sink.close()
            except OSError as e:
                raised.append(e)
                sink.release()

    worker = threading.Thread(target=write_all, daemon=True)
    worker.start()
    worker.join(60)
    assert not worker.is_alive(), "the writer hung after the flusher failed"
    assert raised and raised[0].errno == errno.ENOSPC
    (where / "full").unlink()


def test_a_short_unaligned_write_is_an_error_not_a_misplaced_byte(where: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.pwrite
    calls = []

    def short(fd: int, data: memoryview, offset: int) -> int:
        calls.append(offset)
        return real(fd, data, offset) if len(calls) == 1 else real(fd, data[:ALIGN], offset) - 1

    monkeypatch.setattr(os, "pwrite", short)
    with open(where / "short", "wb") as f:
        sink = FileSink(f)
        sink.write(bytes(BUFFER))
        with pytest.raises(OSError, match="short O_DIRECT write"):
            sink.close()
    (where / "short").unlink()


def test_a_small_file_skips_o_direct_and_a_large_one_uses_it(where: Path) -> None:
    """A size hint below one buffer: the page cache (no buffers, no thread for a few bytes)."""
    for size, direct in ((100, False), (BUFFER - 1, False), (BUFFER, True)):
        target = where / f"hinted-{size}"
        data = os.urandom(size)
        with open(target, "wb") as f:
            sink = FileSink(f, size)
            assert sink.direct == direct
            sink.write(data)
            sink.close()
        assert target.read_bytes() == data
        target.unlink()


def test_no_memory_for_the_buffers_falls_back_and_leaks_no_descriptor(where: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import mmap

    real, made = mmap.mmap, []

    def scarce(*args: object, **kwargs: object) -> mmap.mmap:
        if made:
            raise OSError(errno.ENOMEM, "Cannot allocate memory")
        made.append(real(*args, **kwargs))  # type: ignore[arg-type]
        return made[-1]

    target = where / "scarce"
    with open(target, "wb") as f:
        before = sorted(os.listdir("/proc/self/fd"))
        monkeypatch.setattr(mmap, "mmap", scarce)
        sink = FileSink(f)
        monkeypatch.undo()
        assert not sink.direct and made and made[0].closed
        assert sorted(os.listdir("/proc/self/fd")) == before  # the O_DIRECT descriptor was closed
        sink.write(b"y" * 5000)
        sink.close()
    assert target.read_bytes() == b"y" * 5000
