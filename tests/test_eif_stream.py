"""`StreamedEif` (eif/stream.py): an EIF read from its bytes as they arrive says what `describe`
says of the same file, or refuses it as `describe` does, whatever the chunking; and its result is
bound to the bytes it was fed (`landed`)."""

from __future__ import annotations

import os
import random
import struct
from pathlib import Path

import pytest
from test_eif import APP, _signing_material, blobs, stored_image  # noqa: F401 - blobs is a fixture

from enclaver_rules.eif.build import build_eif
from enclaver_rules.eif.describe import describe
from enclaver_rules.eif.format import HEADER_SIZE, EifError
from enclaver_rules.eif.stream import StreamedEif
from enclaver_rules.errors import OperationFailed
from enclaver_rules.oci.digest import Digest


def streamed(data: bytes, sizes: list[int] | None = None) -> StreamedEif:
    stream = StreamedEif()
    position, i = 0, 0
    while position < len(data):
        step = sizes[i % len(sizes)] if sizes else 1 << 20
        stream.update(data[position:position + step])
        position, i = position + step, i + 1
    return stream


def outcome(read: object) -> object:
    try:
        return read() if callable(read) else read
    except (EifError, OperationFailed, ValueError):
        return "refused"


@pytest.fixture
def eifs(tmp_path: Path, blobs) -> dict[str, bytes]:  # type: ignore[no-untyped-def]  # noqa: F811
    from enclaver_rules.eif.sign import Signer

    cert, key, _ = _signing_material(tmp_path)
    store, image = stored_image(tmp_path, APP, cmd=["/bin/app"])
    build_eif(image, store, blobs, tmp_path / "u.eif")
    build_eif(image, store, blobs, tmp_path / "s.eif", signer=Signer.load(cert, key))
    return {"unsigned": (tmp_path / "u.eif").read_bytes(), "signed": (tmp_path / "s.eif").read_bytes()}


@pytest.mark.parametrize("sizes", [None, [1], [7, 12, 548, 4096], [HEADER_SIZE], [100_003]])
def test_a_streamed_eif_describes_as_the_file_does(tmp_path: Path, eifs: dict[str, bytes],
                                                   sizes: list[int] | None) -> None:
    for name, data in eifs.items():
        if sizes == [1] and name == "signed":
            continue  # one byte at a time: once is enough
        path = tmp_path / f"{name}.eif"
        path.write_bytes(data)
        stream = streamed(data, sizes)
        assert stream.count == len(data)
        assert stream.describe() == describe(str(path))


def test_damaged_eifs_are_refused_or_described_as_the_file_is(tmp_path: Path, eifs: dict[str, bytes]) -> None:
    rng = random.Random(20)
    data = eifs["signed"]
    sections = describe(_write(tmp_path / "s.eif", data))["Sections"]
    cuts = [0, 3, HEADER_SIZE - 1, HEADER_SIZE, HEADER_SIZE + 5, len(data) - 1, len(data) // 2]
    cuts += [s["Offset"] + d for s in sections for d in (0, 5, 12)]
    cases = [data[:cut] for cut in cuts]  # truncated anywhere, section headers included
    cases.append(data + b"trailing bytes are not part of the EIF")
    for offset in [0, 4, 6, 8, 26, 28, 30, 40, 300, 540, 544, *(s["Offset"] + d for s in sections for d in (0, 1, 4, 11)),
                   *(rng.randrange(len(data)) for _ in range(40))]:
        damaged = bytearray(data)
        damaged[offset] ^= 1 << rng.randrange(8)
        cases.append(bytes(damaged))
    # a header that declares a section past the end, and a metadata section too large to read
    huge = bytearray(data)
    struct.pack_into(">Q", huge, 30 + 8 * 32 + 8 * 2, 1 << 40)
    cases.append(bytes(huge))
    for case in cases:
        path = _write(tmp_path / "case.eif", case)
        expected = outcome(lambda: describe(path))  # noqa: B023
        got = outcome(streamed(case, [rng.choice([11, 4096, 1 << 20])]).describe)
        assert got == expected


def _write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def test_the_result_is_bound_to_the_bytes_fed(tmp_path: Path, eifs: dict[str, bytes]) -> None:
    data = eifs["unsigned"]
    digest = Digest.of(data)
    path = tmp_path / "landed.eif"
    path.write_bytes(data)
    whole = streamed(data)
    whole.landed(digest, len(data), path.stat())
    assert (whole.digest, whole.size) == (digest, len(data))
    assert whole.describes(digest, path.stat()) and not whole.describes(Digest.of(b""), path.stat())
    copy = tmp_path / "copy.eif"
    copy.write_bytes(data)
    assert not whole.describes(digest, copy.stat())  # another file with the same bytes
    os.utime(path, ns=(0, 0))
    assert not whole.describes(digest, path.stat())  # touched since it landed
    short = streamed(data[:-1])  # the fetcher kept more bytes than it showed here
    short.landed(digest, len(data), copy.stat())
    assert short.digest is None and short.size is None and not short.describes(digest, copy.stat())
    closed = streamed(data)
    closed.close()
    closed.landed(digest, len(data), copy.stat())
    assert closed.digest is None
    with pytest.raises(EifError):
        closed.describe()


def test_without_the_app_ramdisk_chains_the_rest_is_described_as_the_file_is(tmp_path: Path,
                                                                             eifs: dict[str, bytes]) -> None:
    """`pcrs=False` (a default remote-cache fetch): PCR1, PCR8, CRC, signature and metadata as
    `describe` gives them; PCR0, PCR2 and SignatureCheck (which needs PCR0) left out, not guessed."""
    for name, data in eifs.items():
        full = describe(_write(tmp_path / f"{name}.eif", data))
        stream = StreamedEif(pcrs=False)
        for i in range(0, len(data), 1 << 20):
            stream.update(data[i:i + (1 << 20)])
        got = stream.describe()
        expected = {k: v for k, v in full.items() if k != "SignatureCheck"}
        expected["Measurements"] = {k: v for k, v in full["Measurements"].items() if k not in ("PCR0", "PCR2")}
        assert got == expected
        assert (stream.signature is not None) == (name == "signed")
        if stream.signature is not None:
            assert stream.signature.valid and stream.signature.signed_pcr0 == full["Measurements"]["PCR0"]
