"""Property tests for every reader of hostile input: EIF files, manifest YAML, image configs and
layer tars (as rootfs.py reads them into the customer ramdisk). Each property is the same: the
reader either gives a result, or raises enclaver's own error (`EnclaverError`, which the CLI
prints and turns into exit 1 or 2) — never another exception, which would be exit 3.

`HYPOTHESIS_PROFILE=deep` runs thousands of examples each; the default (`fast`) a few hundred.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tarfile
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cbor2
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from enclaver_rules.cli.main import main
from enclaver_rules.eif.describe import describe
from enclaver_rules.eif.format import (
    SECTION_CMDLINE,
    SECTION_KERNEL,
    SECTION_METADATA,
    SECTION_RAMDISK,
    SECTION_SIGNATURE,
    SectionSource,
    write_eif,
)
from enclaver_rules.eif.metadata import read_metadata
from enclaver_rules.eif.ramdisk import command_files, customer
from enclaver_rules.eif.rootfs import build_tree
from enclaver_rules.eif.sign import read_signature
from enclaver_rules.errors import EnclaverError, InvalidInput
from enclaver_rules.manifest._yaml import load_yaml
from enclaver_rules.oci.model import ImageConfig

WORK = Path(tempfile.mkdtemp(prefix="enclaver-fuzz-"))


@pytest.fixture(scope="module", autouse=True)
def _cleanup() -> Iterator[None]:
    yield
    import shutil

    shutil.rmtree(WORK, ignore_errors=True)


def scratch(name: str, data: bytes) -> Path:
    path = WORK / f"{os.getpid()}-{name}"
    path.write_bytes(data)
    return path


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20)

# -- EIF -------------------------------------------------------------------------------------------


def _signer() -> Any:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from enclaver_rules.eif.sign import Signer

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fuzz")])
    now = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now).sign(key, hashes.SHA256()))
    from cryptography.hazmat.primitives import serialization

    return Signer(cert.public_bytes(serialization.Encoding.PEM), cert, key)


METADATA = (b'{"ImageName":"app","ImageVersion":"1","BuildMetadata":{"BuildTime":"1970-01-01T00:00:00+00:00",'
            b'"BuildTool":"enclaver"},"DockerInfo":null,"CustomMetadata":{"enclaver":{"development":true}}}')


def _eif(metadata: bytes = METADATA, signature: bytes | None = None) -> bytes:
    parts = [(SECTION_KERNEL, b"K" * 40), (SECTION_CMDLINE, b"console=ttyS0"), (SECTION_METADATA, metadata),
             (SECTION_RAMDISK, b"R0" * 8), (SECTION_RAMDISK, b"R1" * 8)]
    if signature is not None:
        parts.append((SECTION_SIGNATURE, signature))
    out = io.BytesIO()
    write_eif(out, "x86_64", [SectionSource(k, len(d), lambda d=d: iter([d])) for k, d in parts])
    return out.getvalue()


def _signature() -> bytes:
    from enclaver_rules.eif.measure import pcr_of
    from enclaver_rules.eif.sign import signature_section

    return signature_section(_signer(), pcr_of(b"x"))


SIGNATURE = _signature()
BASES = (_eif(), _eif(signature=SIGNATURE))
_SIGNER_PEM = _signer().certificate_pem


def _spans(data: bytes) -> list[tuple[int, int, int]]:
    """(kind, data offset, size) of each section, from the header."""
    count = int.from_bytes(data[0x1A:0x1C], "big")
    return [(int.from_bytes(data[o:o + 2], "big"), o + 12, int.from_bytes(data[0x11C + 8 * i:0x124 + 8 * i], "big"))
            for i, o in enumerate(int.from_bytes(data[0x1C + 8 * i:0x24 + 8 * i], "big") for i in range(count))]


def _fix_crc(data: bytearray) -> None:
    if len(data) >= 548:
        data[544:548] = zlib.crc32(bytes(data[:544]) + bytes(data[548:])).to_bytes(4, "big")


@st.composite
def eif_mutants(draw: st.DrawFn) -> bytes:
    """Valid EIFs with hostile metadata or signature sections, and byte-level mutants of valid EIFs
    (aimed at the header, the section headers and the unmeasured sections as often as elsewhere)."""
    if draw(st.integers(0, 2)) == 0:
        metadata = draw(st.one_of(st.just(METADATA), st.binary(max_size=40),
                                  st.builds(lambda v: json.dumps(v).encode(), json_values)))
        return _eif(metadata, draw(st.one_of(st.none(), st.just(SIGNATURE), signature_sections())))
    base = BASES[draw(st.integers(0, 1))]
    spans = _spans(base)
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["set", "set", "set", "insert", "delete", "truncate", "u64"]))
        _kind, offset, size = draw(st.sampled_from(spans))
        where = draw(st.one_of(st.integers(0, 600), st.integers(offset - 12, offset + max(size - 1, 0)),
                               st.integers(0, len(base))))
        where = min(where, max(len(data) - 1, 0))
        if op == "set" and data:
            data[where] = draw(st.integers(0, 255))
        elif op == "insert":
            data[where:where] = draw(st.binary(max_size=16))
        elif op == "delete":
            del data[where:where + draw(st.integers(1, 16))]
        elif op == "truncate":
            del data[where:]
        elif op == "u64" and where + 8 <= len(data):
            data[where:where + 8] = draw(st.sampled_from([0, 1, 547, 548, 2**32, 2**63, 2**64 - 1])).to_bytes(8, "big")
    if draw(st.integers(0, 3)) > 0:
        _fix_crc(data)
    return bytes(data)


@given(eif_mutants())
def test_eif_describe_never_fails_unexpectedly(data: bytes) -> None:
    path = scratch("mutant.eif", data)
    try:
        info = describe(str(path))
    except EnclaverError:
        return
    json.dumps(info, indent=2)  # what `eif describe` prints must print


@given(eif_mutants())
def test_eif_describe_cli_exit_codes(data: bytes) -> None:
    path = scratch("cli.eif", data)
    out, err = io.StringIO(), io.StringIO()
    assert main(["eif", "describe", str(path)], stdout=out, stderr=err) in (0, 1), err.getvalue()


cbor_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.binary(max_size=16) | st.text(max_size=8)
    | st.lists(st.integers(-2, 300), max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["signing_certificate", "signature", "register_value", "register_index", 1]) | st.text(max_size=4),
        inner, max_size=4),
    max_leaves=16)


@st.composite
def signature_sections(draw: st.DrawFn) -> bytes:
    """Real-shaped sections with any part replaced by any CBOR value, or CBOR soup, or bytes."""
    kind = draw(st.integers(0, 2))
    if kind == 0:
        return draw(st.binary(max_size=64))
    if kind == 1:
        return cbor2.dumps(draw(cbor_values))
    signer_pem = _SIGNER_PEM if draw(st.booleans()) else draw(st.binary(max_size=32))  # a real one, or junk
    protected = draw(st.one_of(st.just(cbor2.dumps({1: -7})), st.builds(cbor2.dumps, cbor_values)))
    payload = draw(st.one_of(st.just(cbor2.dumps({"register_value": list(bytes(48))})),
                             st.builds(cbor2.dumps, cbor_values)))
    cose: Any = [protected, draw(cbor_values), payload, draw(st.binary(max_size=70))]
    if draw(st.booleans()):
        cose[draw(st.integers(0, 3))] = draw(cbor_values)
    entry: Any = {"signing_certificate": list(signer_pem), "signature": list(cbor2.dumps(cose))}
    if draw(st.booleans()):
        entry[draw(st.sampled_from(["signing_certificate", "signature"]))] = draw(cbor_values)
    return cbor2.dumps([entry])




@given(signature_sections())
def test_signature_reader(section: bytes) -> None:
    try:
        info = read_signature(section)
    except EnclaverError:
        return
    assert isinstance(info.signed_pcr0, str) and isinstance(info.valid, bool)
    json.dumps(info.issuer)


@given(st.one_of(st.binary(max_size=200), st.builds(lambda v: json.dumps(v).encode(), json_values),
                 st.builds(lambda v: json.dumps({"ImageName": v, "BuildMetadata": v, "CustomMetadata": v}).encode(),
                           json_values)))
def test_metadata_reader(data: bytes) -> None:
    try:
        info = read_metadata(data)
    except ValueError:  # describe turns it into an EifError naming the section
        return
    json.dumps(info, indent=2)


# -- manifest YAML -----------------------------------------------------------------------------------

TAGS = ["", "", "", "!!str ", "!!int ", "!!float ", "!!bool ", "!!null ", "!!map ", "!!seq ", "!!merge ",
        "!!timestamp ", "!!binary ", "!!python/object ", "!x ", "!!value "]
SCALARS = ["1", "-0", "0x1F", "1e999", "9" * 5000, ".inf", ".nan", "yes", "on", "~", "null", "2001-12-14",
           "2001-13-99", "aGk=", "x", "'q'", '"\\u00e9"', "=", "<<", "v1", "app", "80"]
KEYS = ["version", "name", "target", "sources", "app", "ingress", "listen_port", "egress", "allow", "api",
        "defaults", "memory_mb", "<<", "<<", "=", "? x", "8001", "yes", "!!merge <<", "!x k", "!!timestamp 2001-1-1"]


@st.composite
def yaml_nodes(draw: st.DrawFn, depth: int = 0) -> str:
    """Flow-style YAML with anchors, aliases, merges and tags: any of them anywhere."""
    anchors = ["a", "b", "c"]
    prefix = draw(st.sampled_from(TAGS)) + (f"&{draw(st.sampled_from(anchors))} " if draw(st.integers(0, 3)) == 0
                                            else "")
    choice = draw(st.integers(0, 9 if depth < 4 else 3))
    if choice <= 1:
        return f"*{draw(st.sampled_from(anchors + ['missing']))}"
    if choice <= 3:
        return prefix + draw(st.sampled_from(SCALARS))
    if choice <= 5:
        items = draw(st.lists(yaml_nodes(depth + 1), max_size=4))
        return prefix + "[" + ", ".join(items) + "]"
    if choice == 6:
        return prefix + "[" * draw(st.integers(30, 40)) + "]" * draw(st.integers(30, 40))
    pairs = draw(st.lists(st.tuples(st.sampled_from(KEYS), yaml_nodes(depth + 1)), max_size=4))
    return prefix + "{" + ", ".join(f"{k}: {v}" for k, v in pairs) + "}"


@st.composite
def manifests(draw: st.DrawFn) -> str:
    head = 'version: v1\nname: app\ntarget: "r.example.com/app:e"\nsources: {app: "r.example.com/app:1"}\n'
    lines = [f"{draw(st.sampled_from(KEYS))}: {draw(yaml_nodes())}" for _ in range(draw(st.integers(0, 5)))]
    text = (head if draw(st.booleans()) else "") + "\n".join(lines) + "\n"
    if draw(st.booleans()):  # and some token soup, to reach the scanner's and parser's corners
        soup = st.sampled_from(["[", "]", "{", "}", ":", "- ", "&a ", "*a", "<<", "!!merge", "? ", ",", "\n", "  ",
                                "'", '"', "|", ">", "#", "%YAML 1.1\n", "---\n", "\t", "x", "\ufeff", "\x00"])
        at = draw(st.integers(0, len(text)))
        text = text[:at] + "".join(draw(st.lists(soup, max_size=20))) + text[at:]
    return text


@given(manifests())
def test_yaml_loader(text: str) -> None:
    try:
        doc = load_yaml(text, "enclaver.yaml")
    except InvalidInput as e:
        assert all(d.file == "enclaver.yaml" and d.message for d in e.diagnostics)
        return
    json.dumps(doc.data, default=str)  # plain data: no cycles


@given(manifests())
def test_manifest_check_cli(text: str) -> None:
    path = scratch("enclaver.yaml", text.encode("utf-8", "surrogatepass"))
    out, err = io.StringIO(), io.StringIO()
    assert main(["manifest", "check", str(path)], stdout=out, stderr=err) in (0, 2), out.getvalue() + err.getvalue()


# -- image config ------------------------------------------------------------------------------------

CONFIG_FIELDS = ["Cmd", "Entrypoint", "Env", "Labels", "WorkingDir"]


@st.composite
def image_configs(draw: st.DrawFn) -> dict[str, Any]:
    process: Any = {"Cmd": ["/bin/app"], "Env": ["A=1"]}
    for name in draw(st.lists(st.sampled_from(CONFIG_FIELDS), max_size=3)):
        process[name] = draw(json_values | st.lists(st.text(max_size=8), max_size=3)
                             | st.text(max_size=8))
    data: dict[str, Any] = {"architecture": "amd64", "os": "linux", "config": process,
                            "rootfs": {"type": "layers", "diff_ids": []}}
    for name in draw(st.lists(st.sampled_from(["config", "architecture", "os", "variant", "rootfs", "history"]),
                              max_size=2)):
        data[name] = draw(json_values)
    return data


@given(image_configs())
def test_image_config_fields(data: dict[str, Any]) -> None:
    from enclaver_rules.oci.enclave import config_edit
    from enclaver_rules.oci.mutate import edit_image, empty_image

    raw = json.dumps(data).encode()
    config = ImageConfig.parse(raw, "fuzz config")
    for read in (lambda: config.cmd, lambda: config.entrypoint, lambda: config.env, lambda: config.labels,
                 lambda: str(config.platform), lambda: config.diff_ids,
                 lambda: command_files(config.cmd, config.entrypoint, config.env)):
        with contextlib.suppress(InvalidInput):
            read()
    try:
        edit = config_edit(config, "app")
    except InvalidInput:
        return
    edit_image(empty_image("x86_64")[0], config, edit=edit)  # copies and edits the whole config


@given(st.one_of(st.binary(max_size=64), st.builds(lambda v: json.dumps(v).encode(), json_values),
                 st.builds(lambda n: b"[" * n + b"]" * n, st.integers(1, 200_000)),
                 st.builds(lambda n: b'{"created": ' + b"7" * n + b"}", st.integers(1, 10_000))))
def test_image_config_bytes(raw: bytes) -> None:
    with contextlib.suppress(EnclaverError):
        ImageConfig.parse(raw, "fuzz config")


# -- layer tars --------------------------------------------------------------------------------------

SEGMENTS = st.one_of(st.sampled_from(["bin", "etc", "d", "x", ".", "..", "", ".wh.x", ".wh..wh..opq", "proc",
                                      "dev", "caf\udce9", "a" * 255, "b" * 256, "é" * 128]),
                     st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="/\x00"), max_size=6))
NAMES = st.builds("/".join, st.lists(SEGMENTS, min_size=1, max_size=5)) | st.sampled_from(
    ["/".join(["d"] * 1300), "/".join(["d"] * 2100) + "/f", "bin/app", "etc/hosts", "etc/resolv.conf"])
NUMBERS = st.one_of(st.integers(0, 2000), st.sampled_from([0, 2**21 - 1, 2**32 - 1, 2**32, 2**40, -1]))


@st.composite
def members(draw: st.DrawFn) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(draw(NAMES))
    kind = draw(st.sampled_from(["file", "file", "dir", "symlink", "hardlink", "chr", "fifo"]))
    info.type = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE,
                 "hardlink": tarfile.LNKTYPE, "chr": tarfile.CHRTYPE, "fifo": tarfile.FIFOTYPE}[kind]
    info.mode = draw(st.integers(0, 0o7777))
    info.uid, info.gid, info.mtime = draw(NUMBERS), draw(NUMBERS), draw(NUMBERS)
    if kind in ("symlink", "hardlink"):
        info.linkname = draw(NAMES | st.sampled_from(["/", "/etc", "../../x", "bin"]))
    if kind == "chr":
        info.devmajor, info.devminor = draw(NUMBERS), draw(NUMBERS)
    data = b""
    if kind == "file":
        data = draw(st.binary(max_size=40))
        info.size = len(data)
    if draw(st.integers(0, 7)) == 0:  # PAX records a writer may add
        info.pax_headers = {draw(st.sampled_from(["path", "linkpath", "mtime", "uid", "size", "GNU.sparse.map",
                                                  "GNU.sparse.size", "comment"])): draw(st.text(max_size=12))}
    return info, data


@st.composite
def layers(draw: st.DrawFn) -> bytes:
    fmt = draw(st.sampled_from([tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT]))
    raw = io.BytesIO()
    try:
        with tarfile.open(fileobj=raw, mode="w", format=fmt, encoding="utf-8", errors="surrogateescape") as t:
            for info, data in draw(st.lists(members(), max_size=8)):
                t.addfile(info, io.BytesIO(data) if info.isfile() else None)
    except (ValueError, UnicodeError):  # a field this tar format cannot hold: not a layer anyone can make
        assume(False)
    data = bytearray(raw.getvalue())
    for _ in range(draw(st.integers(0, 3)) if draw(st.booleans()) else 0):
        where = draw(st.integers(0, max(len(data) - 1, 0)))
        data[where] = draw(st.integers(0, 255))
    if draw(st.integers(0, 5)) == 0:
        del data[draw(st.integers(0, len(data))):]
    return bytes(data)


@given(st.lists(layers(), min_size=1, max_size=3))
def test_layer_tars_into_the_customer_ramdisk(blobs: list[bytes]) -> None:
    with tempfile.TemporaryDirectory(dir=WORK) as work:
        paths = []
        for i, blob in enumerate(blobs):
            path = Path(work) / f"layer-{i}.tar"
            path.write_bytes(blob)
            paths.append((f"layer {i}", path))
        try:
            tree = build_tree(paths, work)
            ramdisk = customer(tree, b"/bin/app\n", b"")
            size = sum(len(chunk) for chunk in ramdisk.stream())
        except EnclaverError:
            return
        assert size == ramdisk.size
