"""Every field of the payload and the envelope, and the chain, mutated one at a time.

Payload mutations are re-signed with the test chain, so what fails is the syntactic check, never the
signature; bit flips that are not re-signed must fail the signature and nothing earlier."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from attestation_helpers import NOW, SimChain, build_chain, default_chain, sample_document, signed
from enclaver_rules.attestation import chain, cose
from enclaver_rules.attestation.document import FIELDS, encode_payload
from enclaver_rules.attestation.verify import Report, verify

MISSING = object()


def _values() -> dict[str, Any]:
    doc = sample_document()
    values = {name: getattr(doc, name) for name in FIELDS}
    return values | {"pcrs": dict(doc.pcrs), "cabundle": list(doc.cabundle)}


def _check(data: bytes, test_chain: SimChain | None = None, **policy: Any) -> Report:
    c = test_chain or default_chain()
    return verify(data, roots=[c.root.certificate], at=NOW, **policy)


def _code(data: bytes, test_chain: SimChain | None = None, **policy: Any) -> str | None:
    failure = _check(data, test_chain, **policy).failure
    return failure.code if failure else None


def _resigned(payload: bytes) -> bytes:
    return cose.sign1(payload, default_chain().leaf.key)


def test_the_unmutated_document_is_valid() -> None:
    assert _check(signed()).ok
    assert _check(signed(indefinite=False)).ok


PAYLOAD_CASES: list[tuple[str, Any, str]] = [
    ("module_id", 5, "E_FIELD_TYPE"), ("module_id", b"i-1", "E_FIELD_TYPE"), ("module_id", "", "E_FIELD_VALUE"),
    ("module_id", None, "E_FIELD_MISSING"), ("module_id", MISSING, "E_FIELD_MISSING"),
    ("digest", "SHA256", "E_FIELD_VALUE"), ("digest", 384, "E_FIELD_TYPE"), ("digest", None, "E_FIELD_MISSING"),
    ("digest", MISSING, "E_FIELD_MISSING"),
    ("timestamp", "1735732800000", "E_FIELD_TYPE"), ("timestamp", -1, "E_FIELD_TYPE"), ("timestamp", 0, "E_FIELD_VALUE"),
    # a float, and 2**64 (a bignum: tag 2), are outside the CBOR a document may hold: refused by the reader
    ("timestamp", 1.5, "E_PAYLOAD_CBOR"), ("timestamp", True, "E_FIELD_TYPE"), ("timestamp", 2**64, "E_PAYLOAD_CBOR"),
    ("timestamp", 10**15, "E_FIELD_VALUE"), ("timestamp", None, "E_FIELD_MISSING"), ("timestamp", MISSING, "E_FIELD_MISSING"),
    ("pcrs", [bytes(48)], "E_FIELD_TYPE"), ("pcrs", {}, "E_FIELD_VALUE"),
    ("pcrs", {i: bytes(48) for i in range(33)}, "E_FIELD_VALUE"), ("pcrs", {32: bytes(48)}, "E_FIELD_VALUE"),
    ("pcrs", {-1: bytes(48)}, "E_FIELD_VALUE"), ("pcrs", {"0": bytes(48)}, "E_FIELD_TYPE"),
    ("pcrs", {True: bytes(48)}, "E_FIELD_TYPE"), ("pcrs", {0: bytes(47)}, "E_FIELD_VALUE"),
    ("pcrs", {0: bytes(49)}, "E_FIELD_VALUE"), ("pcrs", {0: "00" * 48}, "E_FIELD_TYPE"), ("pcrs", {0: None}, "E_FIELD_TYPE"),
    ("pcrs", None, "E_FIELD_MISSING"), ("pcrs", MISSING, "E_FIELD_MISSING"),
    ("certificate", "MII", "E_FIELD_TYPE"), ("certificate", b"", "E_FIELD_VALUE"),
    ("certificate", bytes(1025), "E_FIELD_VALUE"), ("certificate", None, "E_FIELD_MISSING"),
    ("certificate", MISSING, "E_FIELD_MISSING"), ("certificate", b"\x30\x03\x02\x01\x00", "E_CHAIN"),
    ("cabundle", b"\x30", "E_FIELD_TYPE"), ("cabundle", "x", "E_FIELD_TYPE"), ("cabundle", {0: b"x"}, "E_FIELD_TYPE"),
    ("cabundle", [], "E_FIELD_VALUE"), ("cabundle", ["x"], "E_FIELD_TYPE"), ("cabundle", [b""], "E_FIELD_VALUE"),
    ("cabundle", [bytes(1025)], "E_FIELD_VALUE"), ("cabundle", None, "E_FIELD_MISSING"),
    ("cabundle", MISSING, "E_FIELD_MISSING"),
    *[(name, value, code) for name in ("public_key", "user_data", "nonce") for value, code in
      (("abc", "E_FIELD_TYPE"), (5, "E_FIELD_TYPE"), ([], "E_FIELD_TYPE"), (False, "E_FIELD_TYPE"),
       (bytes(1025), "E_FIELD_VALUE"))],
]


@pytest.mark.parametrize("field, value, code", PAYLOAD_CASES,
                         ids=[f"{f}={'absent' if v is MISSING else type(v).__name__}-{c}" for f, v, c in PAYLOAD_CASES])
def test_payload_field_mutations(field: str, value: Any, code: str) -> None:
    values = _values()
    if value is MISSING:
        del values[field]
    else:
        values[field] = value
    report = _check(_resigned(cbor2.dumps(values)))
    assert report.failure is not None and report.failure.code == code, report.failure
    assert field.split("_")[0] in report.failure.detail or code == "E_FIELD_MISSING" or field == "cabundle"


@pytest.mark.parametrize("name", ["public_key", "user_data", "nonce"])
@pytest.mark.parametrize("value", [MISSING, None, b"", bytes(1024)], ids=["absent", "null", "empty", "1024"])
def test_optional_fields_may_be_absent_null_empty_or_1024_bytes(name: str, value: Any) -> None:
    values = _values()
    if value is MISSING:
        del values[name]
    else:
        values[name] = value
    assert _check(_resigned(cbor2.dumps(values))).ok


def test_unknown_keys() -> None:
    for key, value in (("debug", True), (1, b"x"), (b"nonce", None)):
        values: dict[Any, Any] = _values()
        values[key] = value
        assert _code(_resigned(cbor2.dumps(values))) == "E_FIELD_UNKNOWN"


def _pairs(values: dict[str, Any]) -> bytes:
    return b"".join(cbor2.dumps(k) + cbor2.dumps(v) for k, v in values.items())


def test_duplicate_payload_key() -> None:
    values = _values()
    assert _code(_resigned(bytes([0xAA]) + _pairs(values) + _pairs({"nonce": None}))) == "E_DUPLICATE"
    assert _code(_resigned(b"\xbf" + _pairs(values) + _pairs({"module_id": "x"}) + b"\xff")) == "E_DUPLICATE"


def test_duplicate_pcr_index() -> None:
    values = _values()
    dup_pcrs = bytes([0xA2]) + cbor2.dumps(0) + cbor2.dumps(bytes(48)) + cbor2.dumps(0) + cbor2.dumps(bytes([1]) * 48)
    body = b"".join(cbor2.dumps(k) + (dup_pcrs if k == "pcrs" else cbor2.dumps(v)) for k, v in values.items())
    assert _code(_resigned(b"\xa9" + body)) == "E_DUPLICATE"


@pytest.mark.parametrize("payload, code", [
    (cbor2.dumps([1, 2]), "E_PAYLOAD_CBOR"), (cbor2.dumps("text"), "E_PAYLOAD_CBOR"), (b"\xff", "E_PAYLOAD_CBOR"),
    (cbor2.dumps(_values()) + b"\x00", "E_PAYLOAD_CBOR"), (cbor2.dumps(_values())[:-1], "E_PAYLOAD_CBOR"),
    (b"\xbf" + _pairs(_values()), "E_PAYLOAD_CBOR"), (b"\x81" * 40 + b"\x00", "E_PAYLOAD_CBOR"),
    (bytes(16385), "E_COSE_STRUCT"),
], ids=["array", "text", "break", "trailing", "truncated", "no-break", "deep", "oversize"])
def test_payload_that_is_not_one_map(payload: bytes, code: str) -> None:
    assert _code(_resigned(payload)) == code


def _envelope(*items: Any, tag: int | None = None) -> bytes:
    good = cbor2.loads(signed())
    parts = [good[i] if item is ... else item for i, item in enumerate(items)]
    return cbor2.dumps(cbor2.CBORTag(tag, parts) if tag is not None else parts)


ENVELOPE_CASES: list[tuple[str, bytes, str]] = [
    ("tag17", _envelope(..., ..., ..., ..., tag=17), "E_TAG"), ("tag98", _envelope(..., ..., ..., ..., tag=98), "E_TAG"),
    ("tag1", b"\xc1" + cbor2.dumps(0), "E_TAG"), ("tag18-tag18", b"\xd2" + _envelope(..., ..., ..., ..., tag=18), "E_COSE_STRUCT"),
    ("array3", _envelope(..., ..., ...), "E_COSE_STRUCT"), ("array5", _envelope(..., ..., ..., ..., b""), "E_COSE_STRUCT"),
    ("map", cbor2.dumps({1: 2}), "E_COSE_STRUCT"), ("int", cbor2.dumps(7), "E_COSE_STRUCT"),
    ("protected-map", _envelope({1: -35}, ..., ..., ...), "E_COSE_STRUCT"),
    ("unprotected-array", _envelope(..., [], ..., ...), "E_COSE_STRUCT"),
    ("payload-text", _envelope(..., ..., "x", ...), "E_COSE_STRUCT"),
    ("payload-detached", _envelope(..., ..., None, ...), "E_COSE_STRUCT"),
    ("payload-empty", _envelope(..., ..., b"", ...), "E_COSE_STRUCT"),
    ("signature-text", _envelope(..., ..., ..., "s"), "E_COSE_STRUCT"),
    ("es256", _envelope(cbor2.dumps({1: -7}), ..., ..., ...), "E_PROTECTED"),
    ("alg-text", _envelope(cbor2.dumps({1: "ES384"}), ..., ..., ...), "E_PROTECTED"),
    ("alg-bool-key", _envelope(cbor2.dumps({True: -35}), ..., ..., ...), "E_PROTECTED"),
    ("no-alg", _envelope(cbor2.dumps({}), ..., ..., ...), "E_PROTECTED"),
    ("extra-label", _envelope(cbor2.dumps({1: -35, 4: b"kid"}), ..., ..., ...), "E_PROTECTED"),
    ("dup-alg", _envelope(bytes.fromhex("a20138220138 22".replace(" ", "")), ..., ..., ...), "E_PROTECTED"),
    ("protected-empty", _envelope(b"", ..., ..., ...), "E_PROTECTED"),
    ("protected-garbage", _envelope(b"\xff", ..., ..., ...), "E_PROTECTED"),
    ("protected-trailing", _envelope(cose.PROTECTED_ES384 + b"\x00", ..., ..., ...), "E_PROTECTED"),
    ("sig95", _envelope(..., ..., ..., bytes(95)), "E_SIG_LEN"), ("sig97", _envelope(..., ..., ..., bytes(97)), "E_SIG_LEN"),
    ("sig0", _envelope(..., ..., ..., b""), "E_SIG_LEN"), ("sig-zero", _envelope(..., ..., ..., bytes(96)), "E_SIGNATURE"),
    ("empty", b"", "E_CBOR"), ("break", b"\xff", "E_CBOR"), ("trailing", signed() + b"\x00", "E_CBOR"),
    ("truncated", signed()[:-1], "E_CBOR"), ("huge", b"\x84" + bytes(20000), "E_SIZE"),
]


@pytest.mark.parametrize("name, data, code", ENVELOPE_CASES, ids=[c[0] for c in ENVELOPE_CASES])
def test_envelope_mutations(name: str, data: bytes, code: str) -> None:
    assert _code(data) == code


def test_tags_and_floats_inside_the_document_are_refused_unread() -> None:
    """cbor2 would make a datetime, a regular expression, a float of them; the strict reader refuses."""
    assert _code(_envelope(..., {4: cbor2.CBORTag(1, 0)}, ..., ...)) == "E_TAG"
    assert _code(_envelope(..., {4: 1.5}, ..., ...)) == "E_CBOR"
    report = _check(_resigned(cbor2.dumps(_values() | {"nonce": cbor2.CBORTag(35, "(a+)+$")})))
    assert report.failure is not None and report.failure.code == "E_PAYLOAD_CBOR"
    assert "CBOR tag 35" in report.failure.detail and "nonce" in report.failure.detail


def test_tag18_and_unprotected_headers_are_accepted() -> None:
    assert _check(_envelope(..., ..., ..., ..., tag=18)).ok
    assert _check(_envelope(..., {4: b"kid"}, ..., ...)).ok  # unprotected: not signed, ignored


def test_bit_flips_that_are_not_re_signed_fail_the_signature() -> None:
    data = signed()
    payload = cose.decode_sign1(data).payload
    start = data.index(payload)
    targets = [payload.index(bytes([1]) * 48) + 47, payload.index(b"hello"), payload.index(bytes(20)) + 19]
    for offset in targets:
        for bit in (0, 7):
            flipped = bytearray(data)
            flipped[start + offset] ^= 1 << bit
            assert _code(bytes(flipped)) == "E_SIGNATURE"
    for offset in (len(data) - 1, len(data) - 96, len(data) - 48):
        flipped = bytearray(data)
        flipped[offset] ^= 1
        assert _code(bytes(flipped)) == "E_SIGNATURE"


def _document_for(c: SimChain) -> bytes:
    """Signed by the leaf; a non-P-384 leaf cannot sign ES384, and its chain fails before the signature anyway."""
    key = c.leaf.key if isinstance(c.leaf.key.curve, ec.SECP384R1) else ec.generate_private_key(ec.SECP384R1())
    return cose.sign1(encode_payload(sample_document(c)), key)


def _leaf(issuer: chain.Authority, *, ca: bool = False, key: ec.EllipticCurvePrivateKey | None = None,
          usage: bool = True, digest: hashes.HashAlgorithm | None = None) -> chain.Authority:
    """A leaf the chain module would never issue."""
    key = key or ec.generate_private_key(ec.SECP384R1())
    builder = (x509.CertificateBuilder().subject_name(x509.Name.from_rfc4514_string("CN=odd leaf"))
               .issuer_name(issuer.certificate.subject).public_key(key.public_key()).serial_number(7)
               .not_valid_before(NOW - timedelta(hours=1)).not_valid_after(NOW + timedelta(hours=2))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(usage, False, False, False, False, ca, False, False, False), critical=True))
    return chain.Authority(builder.sign(issuer.key, digest or hashes.SHA384()), key)


def _ca_without_cert_sign(issuer: chain.Authority) -> chain.Authority:
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (x509.CertificateBuilder().subject_name(x509.Name.from_rfc4514_string("CN=weak ca"))
            .issuer_name(issuer.certificate.subject).public_key(key.public_key()).serial_number(8)
            .not_valid_before(NOW - timedelta(days=1)).not_valid_after(NOW + timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, False, True, False, False), critical=True)
            .sign(issuer.key, hashes.SHA384()))
    return chain.Authority(cert, key)


def _weak_ca_chain() -> SimChain:
    base = build_chain(path_lengths=(2, 1))
    weak = _ca_without_cert_sign(base.cas[-1])
    return SimChain(base.root, (*base.cas, weak), chain.new_leaf(weak, "leaf", NOW - timedelta(minutes=1)))


def _with_critical_unknown_extension(issuer: chain.Authority) -> chain.Authority:
    odd = _leaf(issuer)
    cert = (x509.CertificateBuilder().subject_name(odd.certificate.subject).issuer_name(odd.certificate.issuer)
            .public_key(odd.key.public_key()).serial_number(9)
            .not_valid_before(NOW - timedelta(hours=1)).not_valid_after(NOW + timedelta(hours=2))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
            .add_extension(x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.99999.1"), b"\x05\x00"),
                           critical=True)
            .sign(issuer.key, hashes.SHA384()))
    return chain.Authority(cert, odd.key)


CHAIN_CASES: list[tuple[str, Callable[[], SimChain], str, str]] = [
    ("expired-leaf", lambda: build_chain(leaf=lambda i: chain.new_leaf(i, "old", NOW - timedelta(hours=10))),
     "E_CERT_TIME", "certificate is valid"),
    ("future-leaf", lambda: build_chain(leaf=lambda i: chain.new_leaf(i, "new", NOW + timedelta(minutes=1))),
     "E_CERT_TIME", "certificate is valid"),
    ("leaf-is-ca", lambda: build_chain(leaf=lambda i: _leaf(i, ca=True)), "E_CHAIN", "is a CA"),
    ("leaf-cannot-sign", lambda: build_chain(leaf=lambda i: _leaf(i, usage=False)), "E_CHAIN", "digitalSignature"),
    ("leaf-p256", lambda: build_chain(leaf=lambda i: _leaf(i, key=ec.generate_private_key(ec.SECP256R1()))),
     "E_CHAIN", "secp256r1"),
    ("leaf-sha256", lambda: build_chain(leaf=lambda i: _leaf(i, digest=hashes.SHA256())), "E_CHAIN", "ecdsa-with-SHA384"),
    ("ca-without-keyCertSign", _weak_ca_chain, "E_CHAIN", "keyCertSign"),
    ("pathlen-violated", lambda: build_chain(path_lengths=(2, 0, 0)), "E_CHAIN", "pathLen"),
    ("critical-unknown-extension", lambda: build_chain(leaf=_with_critical_unknown_extension), "E_CHAIN", "RFC 5280"),
]


@pytest.mark.parametrize("name, make, code, words", CHAIN_CASES, ids=[c[0] for c in CHAIN_CASES])
def test_chain_mutations(name: str, make: Callable[[], SimChain], code: str, words: str) -> None:
    c = make()
    report = _check(_document_for(c), c)
    assert report.failure is not None and report.failure.code == code, report.failure
    assert words in report.failure.detail


def test_a_wrong_root_is_refused() -> None:
    from enclaver_rules.attestation.roots import aws_root

    assert _code(signed(), build_chain()) == "E_ROOT"
    assert verify(signed(), roots=[aws_root()], at=NOW).failure.code == "E_ROOT"  # type: ignore[union-attr]
    assert verify(signed(), roots=[], at=NOW).failure.code == "E_ROOT"  # type: ignore[union-attr]


def test_a_leaf_the_root_signed_directly_is_valid() -> None:
    c = build_chain(path_lengths=())
    assert len(c.cabundle) == 1 and _check(_document_for(c), c).ok


def test_a_certificate_cryptography_only_warns_about_is_refused(recwarn: pytest.WarningsRecorder) -> None:
    """A negative serial number: cryptography loads it with a deprecation warning; it is no valid certificate."""
    c = default_chain()
    cert = bytearray(c.cabundle[-1])
    at = cert.index(b"\xa0\x03\x02\x01\x02\x02") + 6  # [0] version v3, then the serial's INTEGER length
    cert[at + 1] |= 0x80
    doc = sample_document(cabundle=(*c.cabundle[:-1], bytes(cert)))
    report = _check(cose.sign1(encode_payload(doc), c.leaf.key))
    assert report.failure is not None and report.failure.code == "E_CHAIN" and "cabundle[3]" in report.failure.detail
    assert not recwarn.list
