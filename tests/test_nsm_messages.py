"""The NSM API's CBOR messages: the reference's example bytes, limits checked before anything is
sent, hostile requests answered with an error code and never an exception, and typed answers."""

from __future__ import annotations

import contextlib

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from enclaver_rules.attestation import nsm_messages as m
from enclaver_rules.attestation.nsm_messages import ErrorCode, NsmError

# reference/attestation.md §6.2, byte for byte
EXAMPLES: list[tuple[m.Request, str]] = [
    (m.DescribeNsm(), "6b 44657363726962654e534d"),
    (m.DescribePcr(16), "a1 6b 4465736372696265504352 a1 65 696e646578 10"),
    (m.ExtendPcr(16, b"\x01\x02\x03"), "a1 69 457874656e64504352 a2 65 696e646578 10 64 64617461 43 010203"),
    (m.LockPcr(16), "a1 67 4c6f636b504352 a1 65 696e646578 10"),
    (m.LockPcrs(32), "a1 68 4c6f636b50435273 a1 65 72616e6765 18 20"),
    (m.Attestation(None, b"\xaa" * 4, None),
     "a1 6b 4174746573746174696f6e a3 69 757365725f64617461 f6 65 6e6f6e6365 44 aaaaaaaa 6a 7075626c69635f6b6579 f6"),
    (m.GetRandom(), "69 47657452616e646f6d"),
]


@pytest.mark.parametrize(("request_", "wire"), EXAMPLES, ids=lambda v: getattr(v, "NAME", ""))
def test_requests_are_the_reference_bytes(request_: m.Request, wire: str) -> None:
    assert m.encode_request(request_) == bytes.fromhex(wire)
    assert m.decode_request(bytes.fromhex(wire)) == request_


def test_the_kernels_own_get_random_bytes() -> None:
    assert m.encode_request(m.GetRandom()) == b"\x69GetRandom"  # drivers/misc/nsm.c hard-codes these


requests = st.one_of(
    st.just(m.DescribeNsm()), st.just(m.GetRandom()),
    st.builds(m.DescribePcr, st.integers(0, 31)), st.builds(m.LockPcr, st.integers(0, 31)),
    st.builds(m.LockPcrs, st.integers(0, 32)),
    st.builds(m.ExtendPcr, st.integers(0, 31), st.binary(max_size=m.EXTEND_DATA_MAX)),
    st.builds(m.Attestation, *[st.none() | st.binary(max_size=m.FIELD_MAX)] * 3),
)


@given(requests)
def test_every_request_round_trips_within_the_limit(request: m.Request) -> None:
    body = m.encode_request(request)
    assert len(body) <= m.REQUEST_MAX
    assert m.decode_request(body) == request


def test_the_largest_requests_fit() -> None:
    assert len(m.encode_request(m.ExtendPcr(31, b"x" * m.EXTEND_DATA_MAX))) <= m.REQUEST_MAX
    full = m.Attestation(b"u" * 1024, b"n" * 1024, b"k" * 1024)  # what AWS's nsm-check asks of the NSM
    assert len(m.encode_request(full)) <= m.REQUEST_MAX


@pytest.mark.parametrize(("make", "field", "limit"), [
    (lambda: m.Attestation(user_data=b"x" * 1025), "user_data", 1024),
    (lambda: m.Attestation(nonce=b"x" * 1025), "nonce", 1024),
    (lambda: m.Attestation(public_key=b"x" * 1025), "public_key", 1024),
    (lambda: m.ExtendPcr(16, b"x" * (m.EXTEND_DATA_MAX + 1)), "data", m.EXTEND_DATA_MAX),
])
def test_oversized_fields_are_refused_naming_the_field_and_limit(make: object, field: str, limit: int) -> None:
    with pytest.raises(NsmError, match=rf"\.{field} is {limit + 1} bytes: the NSM takes at most {limit}") as e:
        make()  # type: ignore[operator]
    assert e.value.code is ErrorCode.INPUT_TOO_LARGE


@pytest.mark.parametrize(("make", "code"), [
    (lambda: m.DescribePcr(32), ErrorCode.INVALID_INDEX),
    (lambda: m.ExtendPcr(40, b""), ErrorCode.INVALID_INDEX),
    (lambda: m.LockPcr(0xFFFF), ErrorCode.INVALID_INDEX),
    (lambda: m.LockPcrs(33), ErrorCode.INVALID_INDEX),
    (lambda: m.DescribePcr(-1), ErrorCode.INVALID_ARGUMENT),
    (lambda: m.DescribePcr(0x10000), ErrorCode.INVALID_ARGUMENT),
    (lambda: m.DescribePcr(True), ErrorCode.INVALID_ARGUMENT),
    (lambda: m.ExtendPcr(16, "text"), ErrorCode.INVALID_ARGUMENT),
    (lambda: m.Attestation(nonce=7), ErrorCode.INVALID_ARGUMENT),
])
def test_bad_indices_and_types(make: object, code: ErrorCode) -> None:
    with pytest.raises(NsmError) as e:
        make()  # type: ignore[operator]
    assert e.value.code is code


def test_byte_like_data_is_taken_as_bytes() -> None:
    assert m.ExtendPcr(16, bytearray(b"ab")).data == b"ab"
    assert m.Attestation(nonce=memoryview(b"n")).nonce == b"n"


# --- the simulator's side: hostile requests --------------------------------------------------------


def _refused(body: bytes, code: ErrorCode, match: str = "") -> None:
    with pytest.raises(NsmError, match=match) as e:
        m.decode_request(body)
    assert e.value.code is code


@pytest.mark.parametrize(("body", "code", "match"), [
    (b"", ErrorCode.INVALID_ARGUMENT, "truncated"),
    (b"\xff", ErrorCode.INVALID_ARGUMENT, "a break"),
    (b"\x1c", ErrorCode.INVALID_ARGUMENT, "initial byte"),
    (cbor2.dumps("GetRandom") + b"\x00", ErrorCode.INVALID_ARGUMENT, "after the item"),
    (cbor2.dumps("Reboot"), ErrorCode.INVALID_ARGUMENT, "not an NSM request"),
    (cbor2.dumps("DescribePCR"), ErrorCode.INVALID_ARGUMENT, "needs fields"),
    (cbor2.dumps({"GetRandom": {}}), ErrorCode.INVALID_ARGUMENT, "not an NSM request with fields"),
    (cbor2.dumps({"DescribePCR": {"index": 1}, "LockPCR": {"index": 1}}), ErrorCode.INVALID_ARGUMENT, "one-entry"),
    (cbor2.dumps({"DescribePCR": [1]}), ErrorCode.INVALID_ARGUMENT, "not a map"),
    (cbor2.dumps({"DescribePCR": {}}), ErrorCode.INVALID_ARGUMENT, "lacks its field 'index'"),
    (cbor2.dumps({"DescribePCR": {"index": 1, "pcr": 2}}), ErrorCode.INVALID_ARGUMENT, "no field 'pcr'"),
    (cbor2.dumps({"DescribePCR": {"index": 1.0}}), ErrorCode.INVALID_ARGUMENT, "float"),
    (cbor2.dumps({"DescribePCR": {"index": 99}}), ErrorCode.INVALID_INDEX, "out of range"),
    (cbor2.dumps({"LockPCRs": {"range": 33}}), ErrorCode.INVALID_INDEX, "at most 32"),
    (cbor2.dumps({"ExtendPCR": {"index": 16, "data": "text"}}), ErrorCode.INVALID_ARGUMENT, "byte string"),
    (cbor2.dumps({"Attestation": {"nonce": b"x" * 1025}}), ErrorCode.INPUT_TOO_LARGE, "nonce is 1025 bytes"),
    (b"\x00" * (m.REQUEST_MAX + 1), ErrorCode.INPUT_TOO_LARGE, "at most 4096"),
    (bytes.fromhex("d9 0100 69") + b"GetRandom", ErrorCode.INVALID_ARGUMENT, "tags"),  # a tagged name
    (bytes.fromhex("a2 61 61 01 61 61 02"), ErrorCode.INVALID_ARGUMENT, "twice"),
    (bytes.fromhex("7a ffffffff"), ErrorCode.INVALID_ARGUMENT, "runs past the end"),
    (bytes.fromhex("9b ffffffffffffffff"), ErrorCode.INVALID_ARGUMENT, "more items than"),
    (bytes.fromhex("81") * 10 + b"\x00", ErrorCode.INVALID_ARGUMENT, "nested deeper"),
    (bytes.fromhex("62 c328"), ErrorCode.INVALID_ARGUMENT, "not UTF-8"),
    (bytes.fromhex("bf 61 61 01"), ErrorCode.INVALID_ARGUMENT, "no break"),
    (bytes.fromhex("5f 61 61 ff"), ErrorCode.INVALID_ARGUMENT, "chunk"),
    (bytes.fromhex("a1 a0 00"), ErrorCode.INVALID_ARGUMENT, "map key"),
])
def test_hostile_requests_get_an_error_code(body: bytes, code: ErrorCode, match: str) -> None:
    _refused(body, code, match)


def test_missing_optional_fields_are_null_as_serde_reads_them() -> None:
    assert m.decode_request(cbor2.dumps({"Attestation": {}})) == m.Attestation()
    assert m.decode_request(cbor2.dumps({"Attestation": {"nonce": b"n"}})) == m.Attestation(nonce=b"n")


def test_indefinite_lengths_are_read() -> None:
    body = bytes.fromhex("bf 6b 4465736372696265504352 bf 65 696e646578 10 ff ff")
    assert m.decode_request(body) == m.DescribePcr(16)
    chunked = bytes.fromhex("a1 69 457874656e64504352 a2 65 696e646578 10 64 64617461 5f 41 01 42 0203 ff")
    assert m.decode_request(chunked) == m.ExtendPcr(16, b"\x01\x02\x03")


@given(st.binary(max_size=300))
def test_any_bytes_decode_to_a_request_or_an_nsm_error(body: bytes) -> None:
    try:
        assert isinstance(m.decode_request(body), m.Request)
    except NsmError as e:
        assert isinstance(e.code, ErrorCode)


cbor_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**64), 2**64) | st.binary(max_size=40) | st.text(max_size=20)
    | st.sampled_from(["DescribeNSM", "GetRandom", "DescribePCR", "index", "data", "range", "nonce"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["DescribePCR", "ExtendPCR", "LockPCR", "LockPCRs", "Attestation", "index", "data", "range",
                         "user_data", "nonce", "public_key", "x"]) | st.integers(-5, 40), inner, max_size=3),
    max_leaves=12)


@given(cbor_values)
def test_any_well_formed_cbor_decodes_to_a_request_or_an_nsm_error(value: object) -> None:
    try:
        m.decode_request(cbor2.dumps(value))
    except NsmError as e:
        assert isinstance(e.code, ErrorCode)


# --- the client's side: answers ----------------------------------------------------------------------

PCR = bytes(range(48))
ANSWERS: list[tuple[m.Request, m.Response]] = [
    (m.DescribeNsm(), m.NsmDescription("i-0123456789abcdef0-enc0123456789abcdef", 32, tuple(range(16)), "SHA384",
                                       (1, 0, 0))),
    (m.DescribePcr(3), m.PcrState(True, PCR)),
    (m.ExtendPcr(16, b"x"), m.ExtendedPcr(PCR)),
    (m.LockPcr(16), m.PcrLocked()),
    (m.LockPcrs(32), m.PcrsLocked()),
    (m.Attestation(), m.AttestationDocument(b"\x84document")),
    (m.GetRandom(), m.RandomBytes(b"r" * 256)),
]


@pytest.mark.parametrize(("request_", "answer"), ANSWERS, ids=lambda v: getattr(v, "NAME", ""))
def test_answers_round_trip(request_: m.Request, answer: m.Response) -> None:
    assert m.decode_response(request_, m.encode_response(answer)) == answer


def test_answer_shapes_are_the_apis() -> None:
    assert cbor2.loads(m.encode_response(m.PcrLocked())) == "LockPCR"
    assert cbor2.loads(m.encode_response(m.PcrState(False, PCR))) == {"DescribePCR": {"lock": False, "data": PCR}}
    describe = cbor2.loads(m.encode_response(ANSWERS[0][1]))["DescribeNSM"]
    assert list(describe) == ["version_major", "version_minor", "version_patch", "module_id", "max_pcrs",
                              "locked_pcrs", "digest"]
    assert cbor2.loads(m.encode_error(ErrorCode.READ_ONLY_INDEX)) == {"Error": "ReadOnlyIndex"}


@pytest.mark.parametrize("code", list(ErrorCode))
def test_an_error_answer_raises_with_its_code_and_meaning(code: ErrorCode) -> None:
    with pytest.raises(NsmError, match=f"answered ExtendPCR with Error {code.value}: ") as e:
        m.decode_response(m.ExtendPcr(3, b"x"), m.encode_error(code))
    assert e.value.code is code and code.meaning in str(e.value)
    assert isinstance(e.value, OSError)


@pytest.mark.parametrize(("request_", "answer"), [
    (m.GetRandom(), {"Error": "Teapot"}),
    (m.GetRandom(), {"DescribeNSM": {}}),
    (m.LockPcr(16), "LockPCRs"),
    (m.DescribePcr(1), {"DescribePCR": {"lock": 1, "data": PCR}}),
    (m.DescribePcr(1), {"DescribePCR": {"lock": True, "data": b"short"}}),
    (m.ExtendPcr(16, b""), {"ExtendPCR": {}}),
    (m.Attestation(), {"Attestation": {"document": b""}}),
    (m.DescribeNsm(), {"DescribeNSM": {"version_major": 1, "version_minor": 0, "version_patch": 0, "module_id": "m",
                                       "max_pcrs": 32, "locked_pcrs": [0, "1"], "digest": "SHA384"}}),
    (m.DescribeNsm(), {"DescribeNSM": {"version_major": 1, "version_minor": 0, "version_patch": 0, "module_id": "m",
                                       "max_pcrs": 32, "locked_pcrs": [], "digest": "MD5"}}),
])
def test_odd_answers_are_invalid_responses(request_: m.Request, answer: object) -> None:
    with pytest.raises(NsmError, match=f"answered {request_.NAME} with") as e:
        m.decode_response(request_, cbor2.dumps(answer))
    assert e.value.code is ErrorCode.INVALID_RESPONSE


def test_an_oversized_answer_is_refused_unread() -> None:
    with pytest.raises(NsmError, match="over the 12288-byte limit"):
        m.decode_response(m.GetRandom(), b"\x00" * (m.RESPONSE_MAX + 1))


def test_an_answer_too_large_to_send_becomes_buffer_too_small() -> None:
    body = m.encode_response(m.AttestationDocument(b"d" * m.RESPONSE_MAX))
    assert cbor2.loads(body) == {"Error": "BufferTooSmall"}


@given(st.binary(max_size=300), st.sampled_from([r for r, _ in ANSWERS]))
def test_any_answer_bytes_give_a_result_or_an_nsm_error(body: bytes, request: m.Request) -> None:
    with contextlib.suppress(NsmError):
        m.decode_response(request, body)
