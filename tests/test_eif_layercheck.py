"""Layer digests hashed from the ramdisk's own reads (eif/layercheck.py): in order, out of order,
partly read, and a blob rotted in place, which the store quarantines as before."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from enclaver_rules.eif.layercheck import LayerChecks
from enclaver_rules.oci.store import CorruptBlob, Store


def _blob(tmp_path: Path, data: bytes) -> tuple[Store, Path]:
    store = Store(tmp_path / "store").init()
    return store, store.path(store.put_bytes(data))


def _read(checks: LayerChecks, blob: Path, offset: int, size: int) -> bytes:
    layer = checks.reader(blob)
    assert layer is not None
    return b"".join(layer.read(offset, size))


@pytest.mark.parametrize("spans", [
    [(0, 10), (10, 5 << 20), ((5 << 20) + 10, 100)],  # in order, back to back
    [(512, 4096), (9000, 3 << 20)],  # gaps (tar headers) and an unread end
    [(9000, 3 << 20), (512, 4096), (0, 6 << 20)],  # backwards, then everything again
    [],  # never read: all of it hashed by wait
])
def test_intact_blob_passes_whatever_the_reads(tmp_path: Path, spans: list[tuple[int, int]]) -> None:
    data = os.urandom(6 << 20)
    _, blob = _blob(tmp_path, data)
    checks = LayerChecks()
    checks.add(blob)
    for offset, size in spans:
        assert _read(checks, blob, offset, size) == data[offset:offset + size]
    checks.wait()
    assert blob.exists()
    assert checks.reader(blob) is None  # checked once; later reads go to the file


def test_rotted_blob_is_quarantined(tmp_path: Path) -> None:
    data = os.urandom(2 << 20)
    store, blob = _blob(tmp_path, data)
    with open(blob, "r+b") as f:  # rot in place: same size, one byte flipped
        f.seek(1 << 20)
        f.write(bytes([data[1 << 20] ^ 1]))
    checks = LayerChecks()
    checks.add(blob)
    _read(checks, blob, 0, 1000)
    with pytest.raises(CorruptBlob):
        checks.wait()
    assert not blob.exists() and any((store.root / "quarantine").iterdir())


def test_not_a_store_blob_is_not_checked(tmp_path: Path) -> None:
    path = tmp_path / "layer.tar"
    path.write_bytes(b"x" * 100)
    checks = LayerChecks()
    checks.add(path)
    assert checks.reader(path) is None
    checks.wait()
