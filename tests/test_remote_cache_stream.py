"""A fetch reads the EIF as it downloads (`remote_cache.Landing` feeding `eif/stream.StreamedEif`),
and `check_fetched` uses what was read only for exactly the file that landed: without a registry
(a fake one serves the entry, and can lie), so these run with the unit tests."""

from __future__ import annotations

import json
import os
import shutil
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_eif import APP, _signing_material, stored_image

from enclaver_rules.eif import describe as describe_module
from enclaver_rules.eif.blobs import write_dev_blobs
from enclaver_rules.eif.build import build_eif
from enclaver_rules.eif.stream import StreamedEif
from enclaver_rules.oci.digest import Digest, DigestMismatch
from enclaver_rules.oci.model import Descriptor
from enclaver_rules.rules import eif as eif_rule
from enclaver_rules.rules.common import EIF_FILE, EIF_RECORD, MEASUREMENTS
from enclaver_rules.rules.eif import OUTPUTS, check_fetched
from enclaver_rules.rules.remote_cache import Landing, Poisoned, RemoteCache, entry_manifest

KEY = "ab" * 16


class FakeRegistry:
    """Serves one entry's files, by digest, in `chunk`-byte pieces; `serve` overrides what a digest's
    GET returns (a registry that lies), `cut` ends a transfer early with an error."""

    def __init__(self, files: dict[str, bytes], chunk: int = 1 << 20) -> None:
        self.blobs = {Digest.of(data): data for data in files.values()}
        self.described = [(f, Digest.of(files[f.name]), len(files[f.name])) for f in OUTPUTS]
        self.serve: dict[Digest, bytes] = {}
        self.chunk = chunk

    def get_manifest(self, repository: str, selector: str) -> tuple[bytes, str]:
        return entry_manifest("eif", KEY, self.described, 1700000000), "application/vnd.oci.image.manifest.v1+json"

    def fetch_blob(self, repository: str, descriptor: Descriptor, store: Any, progress: Any = None) -> Digest:
        if store.has(descriptor.digest):
            return descriptor.digest
        data = self.serve.get(descriptor.digest, self.blobs[descriptor.digest])
        chunks = (data[i:i + self.chunk] for i in range(0, len(data), self.chunk))
        return store.put(chunks, descriptor.digest, descriptor.size, source="fake", progress=progress)  # type: ignore[no-any-return]


def make_entry(tmp_path: Path, signed: bool = False) -> tuple[dict[str, bytes], dict[str, Any], dict[str, Any]]:
    """A good entry's files (as a build records them), and the `resolved` and `layer` of its inputs."""
    from enclaver_rules.eif.sign import Signer

    blobs = write_dev_blobs(tmp_path / "blobs", "x86_64")
    store, image = stored_image(tmp_path, APP, cmd=["/bin/app"])
    signing = None
    if signed:
        cert, key, _ = _signing_material(tmp_path)
        signing = {"certificate": str(cert), "key": str(key)}
    result = build_eif(image, store, blobs, tmp_path / "app.eif", image_name="example.test/app:release",
                       epoch=1700000000, signer=Signer.load(cert, key) if signed else None)
    eif = (tmp_path / "app.eif").read_bytes()
    pcrs = {k: v for k, v in result.measurements.to_json().items() if k.startswith("PCR")}
    inputs = {k: {"digest": str(Digest.of(k.encode()))} for k in ("app", "odyn")}
    inputs["blobs"] = {"digest": str(blobs.digest), "path": str(blobs.root), "arch": "x86_64",
                       "development": blobs.development}
    resolved = {"settings": {"target": "example.test/app:release", "epoch": 1700000000, "backend": "pure",
                             "signing": signing}, "blobs": inputs["blobs"], **{k: inputs[k] for k in ("app", "odyn")}}
    layer = {"enclave_image": str(image.digest)}
    record = {"name": "app", "key": KEY, "target": "example.test/app:release", "epoch": 1700000000,
              "enclave_image": str(image.digest), "eif": {"file": EIF_FILE, "sha256": Digest.of(eif).hex,
                                                          "size": len(eif)},
              "measurements": pcrs, "development": blobs.development, "inputs": inputs}
    files = {EIF_RECORD: json.dumps(record).encode(), MEASUREMENTS: eif_rule._measurements_json(pcrs), EIF_FILE: eif}
    return files, resolved, layer


@pytest.fixture
def entry(tmp_path: Path) -> tuple[dict[str, bytes], dict[str, Any], dict[str, Any]]:
    return make_entry(tmp_path)


def fetch(tmp_path: Path, registry: FakeRegistry, monkeypatch: pytest.MonkeyPatch,
          check_pcrs: bool = False) -> tuple[Path, dict[str, Digest] | None, StreamedEif]:
    """As `eif_enclave` fetches, by default (PCR0 and PCR2 taken from the record) or recomputing them."""
    monkeypatch.setattr(RemoteCache, "_registry", lambda self: (registry, "cache"))
    work = tmp_path / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    cache = RemoteCache("fake.test/cache", check_pcrs=check_pcrs)
    streamed = StreamedEif(str(work / EIF_FILE), pcrs=cache.check_pcrs)
    return work, cache.fetch("eif", KEY, work, OUTPUTS, {EIF_FILE: streamed}), streamed


def with_record(files: dict[str, bytes], edit: Any, *, eif: bytes | None = None,
                measurements: bool = True) -> dict[str, bytes]:
    """The entry with its eif.json edited by `edit(record)` (and measurements.json made to agree,
    unless `measurements` is False), its EIF replaced by `eif` (the record's digest made to match)."""
    record = json.loads(files[EIF_RECORD])
    if eif is not None:
        record["eif"]["sha256"] = Digest.of(eif).hex
    edit(record)
    out = {**files, EIF_RECORD: json.dumps(record).encode(), EIF_FILE: eif if eif is not None else files[EIF_FILE]}
    if measurements:
        out[MEASUREMENTS] = eif_rule._measurements_json(record["measurements"])
    return out


@pytest.fixture
def no_second_read(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    def refuse(path: str) -> dict[str, Any]:
        raise AssertionError(f"{path} was read again")
    monkeypatch.setattr(describe_module, "describe", refuse)
    yield


@pytest.mark.parametrize("chunk,check_pcrs", [(1 << 20, False), (4099, False), (4099, True)])
def test_a_good_entry_is_fetched_and_checked_without_reading_the_eif_again(tmp_path: Path, entry: Any, chunk: int,
                                                                           check_pcrs: bool,
                                                                           monkeypatch: pytest.MonkeyPatch,
                                                                           no_second_read: None) -> None:
    files, resolved, layer = entry
    work, digests, streamed = fetch(tmp_path, FakeRegistry(files, chunk), monkeypatch, check_pcrs)
    assert digests is not None and streamed.digest == digests[EIF_FILE]
    assert {p.name for p in work.iterdir()} == set(files)  # no temp files left
    assert all((work / name).read_bytes() == data for name, data in files.items())
    check_fetched(work, KEY, resolved, layer, digests, streamed)


def _tamper(eif: bytes, at: int, *, fix_crc: bool = False) -> bytes:
    """One bit flipped at `at`; with `fix_crc`, the header's CRC made to match again (as an attacker would)."""
    data = bytearray(eif)
    data[at] ^= 1
    if fix_crc:
        struct.pack_into(">I", data, 544, zlib.crc32(data[548:], zlib.crc32(data[:544])))
    return bytes(data)


@pytest.mark.parametrize("how,check_pcrs", [("app ramdisk byte", True), ("crc", False), ("crc", True),
                                            ("kernel byte", False), ("kernel byte", True)])
def test_a_tampered_eif_with_a_consistent_digest_is_refused_from_the_stream(tmp_path: Path, entry: Any, how: str,
                                                                            check_pcrs: bool,
                                                                            monkeypatch: pytest.MonkeyPatch,
                                                                            no_second_read: None) -> None:
    """The registry serves another EIF and a record whose digest matches it (and, but for "crc", a
    header CRC that matches too): the PCRs (or the CRC) read from the stream give it away, without
    reading the file again. PCR1 and the CRC are always recomputed; the app ramdisk's PCRs when asked."""
    files, resolved, layer = entry
    eif = files[EIF_FILE]
    at = {"app ramdisk byte": len(eif) - 100, "crc": 545, "kernel byte": 548 + 12 + 100}[how]
    bad = _tamper(eif, at, fix_crc=how != "crc")
    work, digests, streamed = fetch(tmp_path, FakeRegistry(with_record(files, lambda r: None, eif=bad)),
                                    monkeypatch, check_pcrs)
    assert digests is not None and streamed.digest == Digest.of(bad)
    with pytest.raises(Poisoned, match="CRC does not match" if how == "crc" else "PCRs recomputed"):
        check_fetched(work, KEY, resolved, layer, digests, streamed)


def test_by_default_the_app_ramdisk_pcrs_are_the_records(tmp_path: Path, entry: Any,
                                                        monkeypatch: pytest.MonkeyPatch, no_second_read: None) -> None:
    """The trust boundary, as documented (remote_cache.py: Trust): a writer to the cache who changes
    the application ramdisk and fixes the digest and CRC is not caught by a default fetch, which
    never runs the two SHA-384 chains over that ramdisk; the PCR0 and PCR2 it keeps are the
    record's, so a policy pinning them refuses the EIF the hardware measures."""
    from enclaver_rules.eif import measure

    def no_chain(*args: object) -> None:
        raise AssertionError("a SHA-384 chain over the application ramdisk was started")

    files, resolved, layer = entry
    bad = _tamper(files[EIF_FILE], len(files[EIF_FILE]) - 100, fix_crc=True)
    poisoned = with_record(files, lambda r: None, eif=bad)
    monkeypatch.setattr(measure, "ThreadedHash", no_chain)
    work, digests, streamed = fetch(tmp_path, FakeRegistry(poisoned), monkeypatch)
    assert digests is not None
    check_fetched(work, KEY, resolved, layer, digests, streamed)  # accepted: the documented boundary
    with pytest.raises(AssertionError, match="SHA-384 chain"):  # asked to, it measures (and here refuses)
        fetch(tmp_path, FakeRegistry(poisoned), monkeypatch, check_pcrs=True)


@pytest.mark.parametrize("how", ["records disagree", "uppercase", "short", "extra PCR", "missing PCR2", "not a string"])
def test_the_records_pcrs_are_checked_for_form_and_agreement(tmp_path: Path, entry: Any, how: str,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """PCRs taken from a record go into release labels and KMS key policies: only the three (four,
    signed) SHA-384 values, lowercase hex, the same in eif.json and measurements.json."""
    files, resolved, layer = entry

    def edit(record: dict[str, Any]) -> None:
        pcrs = record["measurements"]
        if how == "uppercase":
            pcrs["PCR2"] = pcrs["PCR2"].upper()
        elif how == "short":
            pcrs["PCR0"] = pcrs["PCR0"][:-2]
        elif how == "extra PCR":
            pcrs["PCR4"] = "00" * 48
        elif how == "missing PCR2":
            del pcrs["PCR2"]
        elif how == "not a string":
            pcrs["PCR0"] = 7
        else:
            pcrs["PCR0"] = "00" * 48

    poisoned = with_record(files, edit, measurements=how != "records disagree")
    work, digests, streamed = fetch(tmp_path, FakeRegistry(poisoned), monkeypatch)
    assert digests is not None
    with pytest.raises(Poisoned, match="give different PCRs" if how == "records disagree" else "96 lowercase hex"):
        check_fetched(work, KEY, resolved, layer, digests, streamed)


@pytest.mark.parametrize("check_pcrs", [False, True])
def test_a_signed_entry_binds_the_pcr0_it_records(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  check_pcrs: bool, no_second_read: None) -> None:
    """A signed EIF's signature is over PCR0: a record claiming another PCR0 (in both files) is
    refused even when PCR0 is not recomputed, and the good entry is accepted."""
    files, resolved, layer = make_entry(tmp_path, signed=True)
    work, digests, streamed = fetch(tmp_path, FakeRegistry(files), monkeypatch, check_pcrs)
    assert digests is not None and "PCR8" in json.loads(files[EIF_RECORD])["measurements"]
    check_fetched(work, KEY, resolved, layer, digests, streamed)

    def claim(record: dict[str, Any]) -> None:
        record["measurements"]["PCR0"] = "00" * 48

    work, digests, streamed = fetch(tmp_path, FakeRegistry(with_record(files, claim)), monkeypatch, check_pcrs)
    assert digests is not None
    with pytest.raises(Poisoned, match="PCRs recomputed" if check_pcrs else "not signed with this build's certificate"):
        check_fetched(work, KEY, resolved, layer, digests, streamed)


def test_bytes_that_do_not_match_their_digest_are_never_kept(tmp_path: Path, entry: Any,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    files, _, _ = entry
    registry = FakeRegistry(files)
    registry.serve[Digest.of(files[EIF_FILE])] = _tamper(files[EIF_FILE], 1000)
    with pytest.raises(DigestMismatch):
        fetch(tmp_path, registry, monkeypatch)
    assert not (tmp_path / "work" / EIF_FILE).exists() and not any(
        p.name.startswith(f".{EIF_FILE}") for p in (tmp_path / "work").iterdir())
    registry.serve[Digest.of(files[EIF_FILE])] = files[EIF_FILE] + b"x"  # longer than declared
    with pytest.raises(DigestMismatch, match="more than the declared"):
        fetch(tmp_path, registry, monkeypatch)
    registry.serve[Digest.of(files[EIF_FILE])] = files[EIF_FILE][:-1]
    with pytest.raises(DigestMismatch, match="cut short"):
        fetch(tmp_path, registry, monkeypatch)
    assert [p.name for p in (tmp_path / "work").iterdir()] == [EIF_RECORD, MEASUREMENTS]  # fetched before the EIF


def test_the_stream_is_used_only_for_the_file_that_landed(tmp_path: Path, entry: Any,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A file changed after it landed (or a stream that was not landed) is read again, and judged
    on its own bytes: the streamed result is never taken for another file's."""
    files, resolved, layer = entry
    work, digests, streamed = fetch(tmp_path, FakeRegistry(files), monkeypatch)
    assert digests is not None
    path = work / EIF_FILE
    path.write_bytes(_tamper(files[EIF_FILE], len(files[EIF_FILE]) - 100, fix_crc=True))  # same size, after
    assert not streamed.describes(digests[EIF_FILE], path.stat())
    with pytest.raises(Poisoned, match="PCRs recomputed"):
        check_fetched(work, KEY, resolved, layer, digests, streamed)
    # fed other bytes than the file's: never landed, so the file is read
    other = StreamedEif()
    other.update(files[EIF_FILE])
    assert not other.describes(digests[EIF_FILE], path.stat())
    path.write_bytes(files[EIF_FILE])
    check_fetched(work, KEY, resolved, layer, digests, other)  # the good file, read from disk


def test_landing_without_a_tap_and_after_a_failed_transfer(tmp_path: Path) -> None:
    data = os.urandom(3 << 20)
    landing = Landing(tmp_path / "blob")
    assert landing.put(iter([data[:5], data[5:]]), Digest.of(data), len(data)) == Digest.of(data)
    assert (tmp_path / "blob").read_bytes() == data and landing.landed

    def broken() -> Iterator[bytes]:
        yield data[:1000]
        raise ConnectionError("reset")

    tap = StreamedEif()
    failed = Landing(tmp_path / "other", tap)
    with pytest.raises(ConnectionError):
        failed.put(broken(), Digest.of(data), len(data))
    assert not failed.landed and tap.digest is None and list(tmp_path.iterdir()) == [tmp_path / "blob"]
    tap.close()


def test_the_pcr_check_is_asked_for_by_the_environment() -> None:
    assert RemoteCache.from_env({"ENC_REMOTE_CACHE": ""}) is None
    default = RemoteCache.from_env({"ENC_REMOTE_CACHE": "reg.test/cache"})
    assert default is not None and not default.check_pcrs and not default.read_only
    asked = RemoteCache.from_env({"ENC_REMOTE_CACHE": "reg.test/cache", "ENC_REMOTE_CACHE_CHECK_PCRS": " Yes "})
    assert asked is not None and asked.check_pcrs
    off = RemoteCache.from_env({"ENC_REMOTE_CACHE": "reg.test/cache", "ENC_REMOTE_CACHE_CHECK_PCRS": "0"})
    assert off is not None and not off.check_pcrs
