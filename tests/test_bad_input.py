"""Hostile input to every reader gives a clear error, through the CLI: exit 2 (invalid input) or the
command's documented failure (exit 1: `eif describe` on a file that is not a valid EIF, a broken
layer), never an internal error (exit 3) — with the input and what is wrong named, in bounded
time and memory. Issue 15, "Bad input gives a clear error".

Readers: the image config (`eif build --image oci:…`), the layer tars as rootfs.py reads them
(`eif build`), EIF files (`eif describe`) and manifests (`manifest check`).
"""

from __future__ import annotations

import io
import json
import random
import struct
import tarfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cbor2
import pytest

from enclaver_rules.cli.exit_codes import code_for
from enclaver_rules.eif.blobs import write_dev_blobs
from enclaver_rules.eif.format import (
    SECTION_CMDLINE,
    SECTION_KERNEL,
    SECTION_METADATA,
    SECTION_RAMDISK,
    SECTION_SIGNATURE,
    SectionSource,
    write_eif,
)
from enclaver_rules.errors import InvalidInput
from enclaver_rules.oci import mediatypes as mt
from enclaver_rules.oci.digest import Digest
from enclaver_rules.oci.flatten import UnsafeLayer
from enclaver_rules.oci.model import Descriptor, ImageConfig
from enclaver_rules.oci.mutate import canonical_json
from enclaver_rules.oci.store import Store

Cli = Callable[..., Any]

# -- helpers: an OCI layout from raw config JSON and raw (uncompressed) layer tars -----------------


def layout(root: Path, layers: list[bytes], process: Any, **config: Any) -> str:
    """`oci:DIR:v` for an image whose config is written as given (no checks, no normalising)."""
    store = Store(root).init()
    descriptors = []
    for blob in layers:
        digest = store.put_bytes(blob)
        descriptors.append({"mediaType": mt.OCI_LAYER, "digest": str(digest), "size": len(blob)})
    raw = config.pop("raw", None)
    data = {"architecture": "amd64", "os": "linux", "config": process,
            "rootfs": {"type": "layers", "diff_ids": [str(Digest.of(b)) for b in layers]}, **config}
    raw = raw if isinstance(raw, bytes) else json.dumps(data).encode()
    config_digest = store.put_bytes(raw)
    manifest = canonical_json({"schemaVersion": 2, "mediaType": mt.OCI_MANIFEST, "config": {
        "mediaType": mt.OCI_CONFIG, "digest": str(config_digest), "size": len(raw)}, "layers": descriptors})
    digest = store.put_bytes(manifest)
    store.tag("v", Descriptor(mt.OCI_MANIFEST, digest, len(manifest)))
    return f"oci:{root}:v"


def member(name: str, kind: str = "file", data: bytes = b"x", **attrs: Any) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.mode = 0o755 if kind == "dir" else 0o644
    if kind == "file":
        info.size = len(data)
    else:
        info.type = {"dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE}[kind]
        info.linkname = data.decode("utf-8", "surrogateescape") if kind != "dir" else ""
    for key, value in attrs.items():
        setattr(info, key, value)
    return info, data if kind == "file" else b""


def tar(members: list[tuple[tarfile.TarInfo, bytes]], fmt: int = tarfile.PAX_FORMAT, **kwargs: Any) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=fmt, encoding="utf-8", errors="surrogateescape", **kwargs) as t:
        for info, data in members:
            t.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return raw.getvalue()


APP = member("bin/app", data=b"#!/bin/sh\n", mode=0o755)
GOOD_PROCESS = {"Cmd": ["/bin/app"]}


@pytest.fixture
def build(cli: Cli, tmp_path: Path) -> Callable[..., Any]:
    """`enclaver eif build` of an image made from `layers` and `process`; returns the CLI result."""
    blobs = tmp_path / "blobs"
    write_dev_blobs(blobs, "x86_64")
    count = iter(range(1000))

    def run(layers: list[bytes], process: Any = GOOD_PROCESS, **config: Any) -> Any:
        n = next(count)
        image = layout(tmp_path / f"image-{n}", layers, process, **config)
        result = cli("eif", "build", "--image", image, "--blobs", str(blobs), "-o", str(tmp_path / f"{n}.eif"),
                     "--cache-dir", str(tmp_path / "cache"), "-q")
        result.eif, result.image = tmp_path / f"{n}.eif", image
        assert "internal error" not in result.stderr, result.stderr
        return result

    return run


def customer_ramdisk(eif: Path) -> bytes:
    data = eif.read_bytes()
    count = struct.unpack_from(">H", data, 0x1A)[0]
    offsets = struct.unpack_from(">32Q", data, 0x1C)[:count]
    sizes = struct.unpack_from(">32Q", data, 0x11C)[:count]
    ramdisks = [(o, s) for o, s in zip(offsets, sizes, strict=True) if struct.unpack_from(">H", data, o)[0] == 3]
    offset, size = ramdisks[1]
    return data[offset + 12: offset + 12 + size]


# -- the image config --------------------------------------------------------------------------------

BAD_PROCESSES = {
    "Cmd of numbers": ({"Cmd": [1, 2]}, "config.Cmd[0]: must be a string, not a number (1)"),
    "Cmd an object": ({"Cmd": {"a": "b"}}, "config.Cmd: must be a list of strings, not an object"),
    "Entrypoint with null": ({"Entrypoint": [None]}, "config.Entrypoint[0]: must be a string, not null"),
    "Env an object": ({"Cmd": ["/bin/app"], "Env": {"A": "1"}}, "config.Env: must be a list of strings, not an object"),
    "Env a number": ({"Cmd": ["/bin/app"], "Env": 5}, "config.Env: must be a list of strings, not a number (5)"),
    "Env a string": ({"Cmd": ["/bin/app"], "Env": "A=1"}, "config.Env: must be a list of strings, not a string"),
    "Env with a list": ({"Cmd": ["/bin/app"], "Env": [["A=1"]]}, "config.Env[0]: must be a string, not a list"),
    "Labels a list": ({"Cmd": ["/bin/app"], "Labels": ["a"]}, "config.Labels: must be an object of strings"),
    "config a list": (["/bin/app"], "config: must be an object, not a list"),
    "Cmd with a lone surrogate": ({"Cmd": ["/bin/app", "\ud800"]}, "is not valid Unicode"),
    "Cmd with a NUL": ({"Cmd": ["/bin/app\0--evil"]}, "contains a newline or NUL"),
}


@pytest.mark.parametrize("case", BAD_PROCESSES)
def test_image_config_with_wrong_json_types_is_invalid_input(build: Any, case: str) -> None:
    process, message = BAD_PROCESSES[case]
    result = build([tar([APP])], process)
    assert result.code == 2, result.stderr
    assert message in result.stderr
    assert result.stderr.startswith((f"{result.image} config: ", "IMAGE: "))  # names the image (and its config)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("architecture", 5, "platform: architecture must be a string, not a number"),
    ("variant", ["v8"], "platform: variant must be a string, not a list"),
    ("rootfs", "layers", "rootfs: must be an object, not a string"),
    ("rootfs", {"diff_ids": ["sha256:nothex"]}, "rootfs.diff_ids[0]: must be a digest"),
    ("history", {"a": 1}, "history: must be a list, not an object"),
])
def test_image_config_top_level_fields_with_wrong_types(build: Any, field: str, value: Any, message: str) -> None:
    result = build([tar([APP])], GOOD_PROCESS, **{field: value})
    assert result.code == 2, result.stderr
    assert message in result.stderr


def test_cmd_as_one_string_is_one_argument_as_docker_reads_it(build: Any) -> None:
    """moby's StrSlice: `"Cmd": "/bin/app"` is `["/bin/app"]`, never one argument per character."""
    result = build([tar([APP])], {"Cmd": "/bin/app", "Entrypoint": None})
    assert result.code == 0, result.stderr
    ramdisk = customer_ramdisk(result.eif)
    assert b"cmd\0" in ramdisk and b"/bin/app\n" in ramdisk and b"/\nb\ni\nn\n" not in ramdisk
    assert ImageConfig(b"", {"config": {"Entrypoint": "/init"}}).entrypoint == ["/init"]


@pytest.mark.parametrize(("raw", "message"), [
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'{"architecture": ' + b"9" * 5000 + b"}", "not JSON"),
])
def test_image_config_that_is_not_readable_json(build: Any, raw: bytes, message: str) -> None:
    result = build([tar([APP])], GOOD_PROCESS, raw=raw)
    assert result.code == 1, result.stderr
    assert message in result.stderr


def test_enclave_config_edit_refuses_wrong_types_before_copying_them() -> None:
    """`enclaver build` copies the app's whole config (oci.mutate); every field it edits is checked first."""
    from enclaver_rules.oci.enclave import config_edit

    for data in ({"config": {"Cmd": ["/a"], "Labels": ["x"]}}, {"config": {"Cmd": ["/a"]}, "history": 3},
                 {"config": {"Cmd": ["/a"]}, "rootfs": "x"}):
        with pytest.raises(InvalidInput):
            config_edit(ImageConfig(json.dumps(data).encode(), data, "app config"), "app")


# -- layer tars, as rootfs.py reads them -------------------------------------------------------------


def deep(depth: int, name: str = "d") -> str:
    return "/".join([name] * depth)


def test_1200_deep_directories_build(build: Any) -> None:
    path = deep(1200)
    result = build([tar([APP, member(path, "dir"), member(path + "/leaf", data=b"deep")])])
    assert result.code == 0, result.stderr
    assert ("rootfs/" + path + "/leaf").encode() + b"\0" in customer_ramdisk(result.eif)


def test_paths_longer_than_linux_allows_are_refused(build: Any) -> None:
    result = build([tar([APP, member(deep(2100) + "/f")])])  # 4,201 bytes
    assert result.code == 2, result.stderr
    assert "bytes long; Linux paths are under 4096" in result.stderr and "layer sha256:" in result.stderr


def test_a_path_made_too_long_through_a_symlink_is_refused(build: Any) -> None:
    """Each name is short, but `l` points 4,000 bytes deep: the export path is checked too."""
    target = deep(2000, "t")
    result = build([tar([APP, member("l", "symlink", target.encode()), member("l/" + deep(60, "e") + "/f")])])
    assert result.code == 2, result.stderr
    assert "the enclave's kernel unpacks paths of at most" in result.stderr


@pytest.mark.parametrize("name", ["a" * 300, "d" * 300 + "/x", "ok/" + "é" * 128 + "/f"])
def test_name_components_over_255_bytes_are_refused(build: Any, name: str) -> None:
    result = build([tar([APP, member(name)])])
    assert result.code == 2, result.stderr
    assert "a name component is" in result.stderr and "Linux allows 255" in result.stderr
    assert "layer sha256:" in result.stderr  # names the layer and the entry


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT, tarfile.PAX_FORMAT])
def test_names_that_are_not_utf8_keep_their_bytes(build: Any, fmt: int) -> None:
    """docker export and linuxkit pass names as bytes: the ramdisk must hold the same bytes."""
    name = b"caf\xe9".decode("utf-8", "surrogateescape")
    result = build([tar([APP, member(name, data=b"latin-1"), member("z", "symlink", b"caf\xe9")], fmt)])
    assert result.code == 0, result.stderr
    ramdisk = customer_ramdisk(result.eif)
    assert b"rootfs/caf\xe9\0" in ramdisk and b"caf\xe9" in ramdisk.split(b"rootfs/z\0", 1)[1][:16]


@pytest.mark.parametrize(("attrs", "message"), [
    ({"uid": 1 << 40}, "uid 1099511627776 does not fit"),
    ({"gid": 1 << 33}, "gid 8589934592 does not fit"),
    ({"mtime": -5}, "mtime -5 does not fit"),
    ({"mtime": 1 << 34}, "mtime 17179869184 does not fit"),
    ({"pax_headers": {"mtime": "inf"}}, "mtime inf does not fit"),
    ({"pax_headers": {"path": "bin/evil\0hidden"}}, "the name contains a NUL byte"),
    ({"pax_headers": {"linkpath": "x\0y"}, "type": tarfile.SYMTYPE}, "the link target contains a NUL byte"),
    ({"pax_headers": {"GNU.sparse.map": "0,1", "GNU.sparse.size": "1", "GNU.sparse.major": "1",
                      "GNU.sparse.minor": "0", "GNU.sparse.name": "sparse"}}, "is a sparse file"),
])
def test_fields_the_ramdisk_cannot_hold_are_refused(build: Any, attrs: dict[str, Any], message: str) -> None:
    result = build([tar([APP, member("etc/file", **attrs)])])
    assert result.code == 2, result.stderr
    assert message in result.stderr


def _pax_header(records: dict[str, str], kind: bytes = tarfile.XHDTYPE, declared: int | None = None) -> bytes:
    body = b""
    for key, value in records.items():
        record = f" {key}={value}\n".encode()
        length = len(record) + 1
        length = len(str(length)) + len(record)
        body += str(length).encode() + record
    info = tarfile.TarInfo("././@PaxHeader")
    info.type, info.size = kind, len(body) if declared is None else declared
    return info.tobuf(tarfile.USTAR_FORMAT) + body + b"\0" * (-len(body) % 512)


@pytest.mark.parametrize("layer", [
    # 5,000 PAX headers in a row: tarfile reads a chain of them recursively
    pytest.param(b"".join(_pax_header({"comment": "x"}) for _ in range(5000)) + tar([APP], tarfile.USTAR_FORMAT),
                 id="extended-header-chain"),
    pytest.param(_pax_header({"comment": "x" * (3 << 20)}) + tar([APP], tarfile.USTAR_FORMAT), id="huge-pax-header"),
    pytest.param(b"".join(_pax_header({f"k{i}": "v" * 4000}, tarfile.XGLTYPE) for i in range(20))
                 + tar([APP], tarfile.USTAR_FORMAT), id="global-headers-pile-up"),
    pytest.param(tar([APP])[:1024] + b"garbage!" * 64 + tar([member("later")]), id="garbage-between-members"),
])
def test_broken_tar_structure_is_a_broken_layer(build: Any, layer: bytes) -> None:
    start = time.monotonic()
    result = build([layer])
    assert result.code == 1, result.stderr
    assert "broken layer" in result.stderr
    assert time.monotonic() - start < 30


def test_many_opaque_markers_cost_linear_time(build: Any) -> None:
    """An opaque marker repeated after many files used to rebuild the directory each time."""
    layer = tar([member(f"d/f{i}", data=b"") for i in range(12000)]
                + [member("d/.wh..wh..opq", data=b"") for _ in range(12000)], tarfile.USTAR_FORMAT)
    start = time.monotonic()
    result = build([tar([APP]), layer])
    assert result.code == 0, result.stderr
    assert time.monotonic() - start < 10  # about 3 s; 17 s when each marker rebuilt the directory


def test_symlink_mazes_are_bounded(build: Any) -> None:
    """Links whose targets are long chains of `./`: each lookup is capped, the image's total too."""
    maze = [member(f"l{i}", "symlink", ("./" * 1000 + f"l{i + 1}").encode()) for i in range(30)]
    result = build([tar([APP, member("l30", "dir"), *maze, *[member(f"l0/f{i}") for i in range(50)]])])
    assert result.code == code_for(UnsafeLayer("x")), result.stderr  # the code flatten.py gives a hostile layer
    assert "resolving the path takes more than 4096 steps" in result.stderr


# -- EIF files (`eif describe`) -----------------------------------------------------------------------


def _signer(tmp_path: Path) -> Any:
    """A P-384 signer whose certificate's issuer has an attribute whose value is bytes, not text."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.name import _ASN1Type
    from cryptography.x509.oid import NameOID

    from enclaver_rules.eif.sign import Signer

    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hostile"),
                      x509.NameAttribute(NameOID.X500_UNIQUE_IDENTIFIER, b"\x01\x02", _type=_ASN1Type.BitString)])
    now = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now).sign(key, hashes.SHA384()))
    (tmp_path / "c.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "k.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    return Signer.load(tmp_path / "c.pem", tmp_path / "k.pem")


def eif_bytes(metadata: bytes = b"{}", signature: bytes | None = None) -> bytes:
    """A small EIF with the sections given (kernel and ramdisks are stand-ins), CRC correct."""
    parts = [(SECTION_KERNEL, b"KERNEL"), (SECTION_CMDLINE, b"console=ttyS0"), (SECTION_METADATA, metadata),
             (SECTION_RAMDISK, b"R0"), (SECTION_RAMDISK, b"R1")]
    if signature is not None:
        parts.append((SECTION_SIGNATURE, signature))
    out = io.BytesIO()
    write_eif(out, "x86_64", [SectionSource(k, len(d), lambda d=d: iter([d])) for k, d in parts])
    return out.getvalue()


def with_crc(data: bytes) -> bytes:
    fixed = bytearray(data)
    fixed[544:548] = zlib.crc32(bytes(fixed[:544]) + bytes(fixed[548:])).to_bytes(4, "big")
    return bytes(fixed)


@pytest.fixture
def describe(cli: Cli, tmp_path: Path) -> Callable[[bytes], Any]:
    def run(data: bytes) -> Any:
        path = tmp_path / "x.eif"
        path.write_bytes(data)
        result = cli("eif", "describe", str(path))
        assert "internal error" not in result.stderr, result.stderr
        return result
    return run


METADATA = {
    "not UTF-8": (b'{"ImageName": "\xff"}', "byte 15 is not UTF-8"),
    "not JSON": (b'{"ImageName": ', "not JSON"),
    "a list": (b"[1, 2]", "not a JSON object"),
    "BuildMetadata a number": (b'{"BuildMetadata": 5}', "BuildMetadata is not an object"),
    "BuildMetadata a list of pairs": (b'{"BuildMetadata": [["a", 1]]}', "BuildMetadata is not an object"),
    "nested past the decoder": (b'{"CustomMetadata": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", "nested more than 64"),
    "nested past printing": (b'{"CustomMetadata": ' + b"[" * 500 + b"]" * 500 + b"}", "nested more than 64"),
    "a 5,000-digit number": (b'{"ImageName": ' + b"7" * 5000 + b"}", "not JSON"),
    "over 1 MiB": (b'{"ImageName": "' + b"x" * (1 << 20) + b'"}', "more than the 1,048,576 it may have"),
}


@pytest.mark.parametrize("case", METADATA)
def test_malformed_metadata_section(describe: Any, case: str) -> None:
    metadata, message = METADATA[case]
    result = describe(eif_bytes(metadata))
    assert result.code == 1, result.stderr
    assert "metadata section" in result.stderr and message in result.stderr


def _uints(data: bytes) -> list[int]:
    return list(data)


def _signature(tmp_path: Path, **replace: Any) -> bytes:
    """A real signature section, with parts replaced (`cert`, `cose`, `protected`, `payload`, …)."""
    from cryptography.hazmat.primitives import serialization

    signer = _signer(tmp_path)
    protected = replace.get("protected", cbor2.dumps({1: -35}))
    payload = replace.get("payload", cbor2.dumps({"register_index": 0, "register_value": _uints(bytes(48))}))
    cose = replace.get("cose", cbor2.dumps([protected, {}, payload, replace.get("sig", bytes(96))]))
    cert = replace.get("cert", _uints(signer.certificate.public_bytes(serialization.Encoding.PEM)))
    return replace.get("section", cbor2.dumps([{"signing_certificate": cert, "signature": _uints(cose)
                                                if isinstance(cose, bytes) else cose}]))


SIGNATURES: dict[str, tuple[dict[str, Any], str]] = {
    "not CBOR": ({"section": b"\xff\xfe"}, "signature section at offset"),
    "truncated CBOR": ({"section": b"\x9b\x00\x00\x00\x10\x00\x00\x00\x00"}, "is malformed"),
    "two entries": ({"section": cbor2.dumps([{}, {}])}, "not a list of one"),
    "a map": ({"section": cbor2.dumps({"signing_certificate": 1})}, "not a list of one"),
    "certificate a huge number": ({"cert": 1 << 62}, "signing_certificate is not a byte string"),
    "certificate bytes out of range": ({"cert": [300, 1]}, "signing_certificate is not a byte string"),
    "certificate a cycle": ({"section": b"\x81\xa2\x73signing_certificate\xd8\x1c\x81\xd8\x1d\x00\x69signature\x80"},
                            "is malformed"),
    "certificate not PEM": ({"cert": _uints(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")},
                            "is malformed"),
    "COSE of three": ({"cose": cbor2.dumps([b"", {}, b""])}, "not a COSE_Sign1"),
    "COSE not bytes": ({"cose": 7}, "signature is not a byte string"),
    "algorithm a list": ({"protected": cbor2.dumps({1: [1, 2]})}, "names no algorithm"),
    "protected header a number": ({"protected": cbor2.dumps(5)}, "names no algorithm"),
    "payload a list": ({"payload": cbor2.dumps([1])}, "the payload is not a map"),
    "PCR0 a string": ({"payload": cbor2.dumps({"register_value": "abc"})}, "register_value is not a byte string"),
    "signature a number": ({"sig": 12}, "the signature is not a byte string"),
}


@pytest.mark.parametrize("case", SIGNATURES)
def test_malformed_signature_section(describe: Any, tmp_path: Path, case: str) -> None:
    replace, message = SIGNATURES[case]
    result = describe(eif_bytes(signature=_signature(tmp_path, **replace)))
    assert result.code == 1, result.stderr
    assert "signature section" in result.stderr and message in result.stderr


def test_well_formed_signature_that_does_not_verify_is_a_finding(describe: Any, tmp_path: Path) -> None:
    """Described (a bytes-valued issuer attribute shown in hex), and exit 1 because it does not verify."""
    result = describe(eif_bytes(signature=_signature(tmp_path)))  # r‖s all zeros: never valid
    assert result.code == 1 and "does not verify" in result.stderr
    assert '"SignatureCheck": false' in result.stdout and '"commonName": "hostile"' in result.stdout
    assert '"x500UniqueIdentifier": "0102"' in result.stdout


def test_random_mutants_of_metadata_and_signature_sections(describe: Any, tmp_path: Path) -> None:
    """The reported finding: 30 of 300 random mutants gave exit 3. Bytes are changed in the two
    unmeasured sections of a signed EIF, and the CRC is fixed most of the time so the parsers run."""
    from enclaver_rules.eif.measure import pcr_of
    from enclaver_rules.eif.sign import signature_section

    signer = _signer(tmp_path)
    metadata = b'{"ImageName":"app","ImageVersion":"1","BuildMetadata":{"BuildTool":"enclaver"},"DockerInfo":null}'
    data = eif_bytes(metadata, signature_section(signer, pcr_of(b"x")))
    count = struct.unpack_from(">H", data, 0x1A)[0]
    offsets = struct.unpack_from(">32Q", data, 0x1C)[:count]
    sizes = struct.unpack_from(">32Q", data, 0x11C)[:count]
    spans = [(o + 12, s) for o, s in zip(offsets, sizes, strict=True) if struct.unpack_from(">H", data, o)[0] in (4, 5)]
    rng = random.Random(15)
    codes = set()
    for _ in range(300):
        offset, size = rng.choice(spans)
        mutant = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            mutant[offset + rng.randrange(size)] = rng.randrange(256)
        codes.add(describe(with_crc(bytes(mutant)) if rng.random() < 0.8 else bytes(mutant)).code)
    assert codes <= {0, 1}


@pytest.mark.parametrize(("make", "code", "message"), [
    (lambda p: p / "missing.eif", 2, "cannot read the EIF: No such file or directory"),
    (lambda p: p, 2, "cannot read the EIF: Is a directory"),
    (lambda p: Path("/dev/null"), 2, "not a regular file"),
])
def test_eif_paths_that_cannot_be_read(cli: Cli, tmp_path: Path, make: Any, code: int, message: str) -> None:
    result = cli("eif", "describe", str(make(tmp_path)))
    assert result.code == code and message in result.stderr, result.stderr


# -- manifests (`manifest check`) ---------------------------------------------------------------------

HEAD = 'version: v1\nname: app\ntarget: "registry.example.com/app:enclave"\nsources:\n  app: "registry.example.com/app:1.0"\n'


def check(cli: Cli, in_tmp: Path, text: str) -> Any:
    (in_tmp / "enclaver.yaml").write_text(text)
    start = time.monotonic()
    result = cli("manifest", "check", "enclaver.yaml")
    assert time.monotonic() - start < 20
    assert "internal error" not in result.stderr, result.stderr
    return result


YAML_ATTACKS = {
    "merge of a scalar": (HEAD + "ingress:\n  - {<<: 5, listen_port: 80}\n",
                          "enclaver.yaml:7:10: ingress[0]: `<<` (merge) must be given a map or a list of maps, not '5'"),
    "merge of a list with a scalar": (HEAD + "ingress:\n  - {<<: [5], listen_port: 80}\n",
                                      "enclaver.yaml:7:11: ingress[0]: `<<` (merge) must be given maps only"),
    "merge of a string": (HEAD + "defaults: {<<: text}\n", "`<<` (merge) must be given a map or a list of maps"),
    "a map merging itself": (HEAD + "defaults: &d {<<: *d}\n", "`<<` (merge) merges a map into itself"),
    "a list holding itself": (HEAD + "ingress: &i [*i]\n", "aliases nest lists and maps more than 32 levels deep"),
    "deep flow lists": (HEAD + "ingress: " + "[" * 3000 + "]" * 3000 + "\n",
                        "enclaver.yaml:6:41: invalid YAML: lists and maps nested more than 32 levels deep"),
    "deep block maps": ("version: v1\n" + "".join(" " * i + f"k{i}:\n" for i in range(900)),
                        "invalid YAML: lists and maps nested more than 32 levels deep"),
    "deep block lists": (HEAD + "ingress:\n" + "".join("  " * i + "-\n" for i in range(900)),
                         "invalid YAML: lists and maps nested more than 32 levels deep"),
    "a long alias chain": (HEAD + "x0: &x0 [1]\n" + "".join(f"x{i}: &x{i} [*x{i - 1}]\n" for i in range(1, 1500)),
                           "aliases nest lists and maps more than 32 levels deep"),
    "a key with a custom tag": (HEAD + "!foo ingress: []\n", "YAML tag '!foo' is not allowed in a manifest"),
    "a key with a bad timestamp": (HEAD + "!!timestamp 2001-13-99: 1\n", "cannot read key '2001-13-99'"),
    "a value that is no timestamp": (HEAD.replace("version: v1", "version: !!timestamp 1"),
                                     "enclaver.yaml:1:10: version: cannot read '1' as timestamp"),
    "a value that is no boolean": (HEAD + "kms_proxy: !!bool maybe\n", "cannot read 'maybe' as bool"),
}


@pytest.mark.parametrize("case", YAML_ATTACKS)
def test_hostile_yaml_is_invalid_input(cli: Cli, in_tmp: Path, case: str) -> None:
    text, message = YAML_ATTACKS[case]
    result = check(cli, in_tmp, text)
    assert result.code == 2, result.stdout + result.stderr
    assert message in result.stdout, result.stdout


def test_merge_keys_follow_yaml_explicit_keys_win(cli: Cli, in_tmp: Path) -> None:
    """`<<` as YAML 1.1 defines it: explicit keys override merged ones (not a "duplicate key"),
    and of several merged maps the first wins."""
    text = (HEAD + "defaults: &d {memory_mb: 512, cpu_count: 2}\n"
            "ingress:\n  - &p {listen_port: 80}\n  - {<<: *p, listen_port: 81}\n"
            "api: {<<: [{listen_port: 9000}, {listen_port: 9001}]}\n")
    result = check(cli, in_tmp, text)
    assert result.code == 0, result.stdout
    from enclaver_rules.manifest.load import check_file

    data = check_file("enclaver.yaml").doc.data  # type: ignore[union-attr]
    assert data["ingress"] == [{"listen_port": 80}, {"listen_port": 81}] and data["api"] == {"listen_port": 9000}
    bad = check(cli, in_tmp, HEAD + "api: {<<: {listen_port: 9000}, listen_port: 0}\n")
    assert "enclaver.yaml:6:45: api.listen_port: 0 is less than the minimum 1" in bad.stdout  # the explicit one
    # merges are resolved once per map: 4 ** 24 merged keys if each alias were expanded again
    bomb = check(cli, in_tmp, HEAD + "m0: &m0 {a: 1}\n" + "".join(
        f"m{i}: &m{i} {{<<: [*m{i - 1}, *m{i - 1}, *m{i - 1}, *m{i - 1}], k{i}: 1}}\n" for i in range(1, 25)))
    assert "unknown key 'm24'" in bomb.stdout and "duplicate" not in bomb.stdout


# -- against a real engine ---------------------------------------------------------------------------


def _newc_names(ramdisk: bytes) -> list[bytes]:
    names, pos = [], 0
    while ramdisk[pos:pos + 6] == b"070701":
        namesize, size = int(ramdisk[pos + 94:pos + 102], 16), int(ramdisk[pos + 54:pos + 62], 16)
        name = ramdisk[pos + 110:pos + 110 + namesize - 1]
        pos += 110 + namesize
        pos += -pos % 4 + size
        pos += -pos % 4
        if name == b"TRAILER!!!":
            break
        names.append(name)
    return names


@pytest.mark.services
def test_names_that_are_not_utf8_match_a_real_docker_export(dockerd: Any, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Names are the bytes Docker exports, in the order it exports them: sorted as bytes, which
    differs from code point order for names that are not UTF-8."""
    import docker
    from test_eif import stored_image

    from enclaver_rules.eif.build import build_eif
    from enclaver_rules.oci.engine import Engine
    from enclaver_rules.oci.transfer import docker_archive

    monkeypatch.setenv("DOCKER_HOST", dockerd.host)
    names = [b"caf\xe9", "café".encode(), b"\xff", "中".encode(), b"a\x80b", b"z", b"\x80x"]  # \x80x < 中 as bytes
    members = [APP, member("n", "dir")] + [member("n/" + n.decode("utf-8", "surrogateescape")) for n in names]
    store, image = stored_image(tmp_path, [tar(members, tarfile.GNU_FORMAT)], cmd=["/bin/app"])
    Engine().load(docker_archive(image, store, "enclaver-test/names:1"))
    client = docker.DockerClient(base_url=dockerd.host, version="auto")
    try:
        container = client.containers.create("enclaver-test/names:1", network_mode="none")
        try:
            export = b"".join(container.export())
        finally:
            container.remove()
    finally:
        client.close()
    with tarfile.open(fileobj=io.BytesIO(export), encoding="utf-8", errors="surrogateescape") as t:
        exported = [m.name.encode("utf-8", "surrogateescape") for m in t if m.name.startswith("n/")]
    build_eif(image, store, write_dev_blobs(tmp_path / "blobs", "x86_64"), tmp_path / "x.eif")
    ours = _newc_names(customer_ramdisk(tmp_path / "x.eif"))
    assert [n[len(b"rootfs/"):] for n in ours if n.startswith(b"rootfs/n/") and n != b"rootfs/n/"] == exported
    assert exported == [b"n/" + n for n in sorted(names)]
