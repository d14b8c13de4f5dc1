"""`cbor_strict`, the one CBOR reader of hostile bytes: RFC 8949's examples in its subset, every
refusal (naming the tag, the offset and the path), memory bounded by the input, any bytes giving a
value or CborError, and the same values as cbor2 on real documents and on random CBOR."""

from __future__ import annotations

import contextlib
import tracemalloc
from collections.abc import Mapping
from typing import Any

import cbor2
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from attestation_helpers import DERIVED, REAL
from enclaver_rules.attestation.cbor_strict import CborError, DuplicateKey, Tagged, TagNotAllowed, decode

DEPTH = 16


def _decode(hexed: str, **kw: Any) -> Any:
    return decode(bytes.fromhex(hexed), **({"max_depth": DEPTH} | kw))


def _refused(hexed: str, match: str, error: type[CborError] = CborError, **kw: Any) -> CborError:
    with pytest.raises(error, match=match) as e:
        _decode(hexed, **kw)
    return e.value


# RFC 8949 Appendix A, the examples in the subset (all of them but floats, simple values, tags)
APPENDIX_A: list[tuple[str, object]] = [
    ("00", 0), ("01", 1), ("0a", 10), ("17", 23), ("1818", 24), ("1819", 25), ("1864", 100), ("1903e8", 1000),
    ("1a000f4240", 1000000), ("1b000000e8d4a51000", 1000000000000), ("1bffffffffffffffff", 2**64 - 1),
    ("3bffffffffffffffff", -(2**64)), ("20", -1), ("29", -10), ("3863", -100), ("3903e7", -1000),
    ("f4", False), ("f5", True), ("f6", None),
    ("40", b""), ("4401020304", b"\x01\x02\x03\x04"),
    ("60", ""), ("6161", "a"), ("6449455446", "IETF"), ("62225c", '"\\'), ("62c3bc", "\u00fc"),
    ("63e6b0b4", "\u6c34"), ("64f0908591", "\U00010151"),
    ("80", []), ("83010203", [1, 2, 3]), ("8301820203820405", [1, [2, 3], [4, 5]]),
    ("98190102030405060708090a0b0c0d0e0f101112131415161718181819", list(range(1, 26))),
    ("a0", {}), ("a201020304", {1: 2, 3: 4}), ("a26161016162820203", {"a": 1, "b": [2, 3]}),
    ("826161a161626163", ["a", {"b": "c"}]),
    ("a56161614161626142616361436164614461656145", {"a": "A", "b": "B", "c": "C", "d": "D", "e": "E"}),
    # indefinite lengths
    ("5f42010243030405ff", b"\x01\x02\x03\x04\x05"), ("7f657374726561646d696e67ff", "streaming"),
    ("9fff", []), ("9f018202039f0405ffff", [1, [2, 3], [4, 5]]), ("9f01820203820405ff", [1, [2, 3], [4, 5]]),
    ("83018202039f0405ff", [1, [2, 3], [4, 5]]), ("83019f0203ff820405", [1, [2, 3], [4, 5]]),
    ("9f0102030405060708090a0b0c0d0e0f101112131415161718181819ff", list(range(1, 26))),
    ("bf61610161629f0203ffff", {"a": 1, "b": [2, 3]}), ("826161bf61626163ff", ["a", {"b": "c"}]),
    ("bf6346756ef563416d7421ff", {"Fun": True, "Amt": -2}),
]


@pytest.mark.parametrize(("hexed", "value"), APPENDIX_A, ids=[h[:20] for h, _ in APPENDIX_A])
def test_rfc8949_appendix_a(hexed: str, value: object) -> None:
    assert repr(_decode(hexed)) == repr(value)  # repr: True is not 1, b"" is not ""


def test_empty_chunks_and_empty_indefinite_strings() -> None:
    assert _decode("5fff") == b"" and _decode("7fff") == "" and _decode("7f60606161ff") == "a"


@pytest.mark.parametrize(("hexed", "value"), [
    ("1b0000000000000001", 1), ("1900ff", 255), ("3a00000000", -1), ("780161", "a"), ("5900024142", b"AB"),
    ("980100", [0]), ("b9000100f6", {0: None}), ("1b0000000000000018", 24),
])
def test_non_minimal_heads_are_read(hexed: str, value: object) -> None:
    assert _decode(hexed) == value


@pytest.mark.parametrize(("hexed", "tag"), [
    ("d8236161", 35), ("d8246161", 36), ("d81c80", 28), ("d81d00", 29), ("d9010280", 258),
    ("c249010000000000000000", 2), ("c349010000000000000000", 3),  # RFC 8949's 2**64 and -2**64 - 1
    ("c074323031332d30332d32315432303a30343a30305a", 0), ("c11a514b67b0", 1), ("c1fb41d452d9ec200000", 1),
    ("d74401020304", 23), ("d818456449455446", 24), ("d82076687474703a2f2f7777772e6578616d706c652e636f6d", 32),
    ("c4820021", 4), ("d9d9f700", 55799), ("db000000010000000000", 2**32), ("d280", 18),
])
def test_tags_not_allowed_are_refused_by_number(hexed: str, tag: int) -> None:
    error = _refused(hexed, rf"CBOR tag {tag} ", TagNotAllowed)
    assert isinstance(error, TagNotAllowed) and error.tag == tag and error.offset == 0


def test_an_allowed_tag_only_around_the_whole_item() -> None:
    assert _decode("d280", tags={18}) == Tagged(18, [])
    assert _decode("d2d280", tags={18}) == Tagged(18, Tagged(18, []))  # the caller judges what is inside
    assert _refused("d180", r"tag 17 \(allowed tags: none or 18\)", TagNotAllowed, tags={18}).tag == 17
    nested = _refused("8201d280", r"tag 18 \(allowed tags: none inside an array or map\) at offset 2 \(in \[1\]\)",
                      TagNotAllowed, tags={18})
    assert nested.path == [1]
    _refused("a101d280", "tag 18", TagNotAllowed, tags={18})
    _refused("d2c11a514b67b0", "tag 1 ", TagNotAllowed, tags={18})


@pytest.mark.parametrize("hexed", ["f90000", "f93c00", "fa47c35000", "fb3ff199999999999a", "f97e00", "fbfff0000000000000"])
def test_floats_are_refused(hexed: str) -> None:
    _refused(hexed, f"a float \\(0x{hexed[:2]}\\) is not allowed at offset 0")


@pytest.mark.parametrize("hexed", ["f7", "f0", "f8ff", "f820", "e0", "f818"])
def test_undefined_and_other_simple_values_are_refused(hexed: str) -> None:
    _refused(hexed, "undefined|a simple value")


@pytest.mark.parametrize(("hexed", "key"), [
    ("a2010001f6", 1), ("a2616101616102", "a"), ("a241610041610f", b"a"),
    ("bf6161016162026161f6ff", "a"),  # across an indefinite map
    ("a1616ebf0000616100000000ff", 0),  # inside a nested indefinite map
    ("bf6161017f6161ff02ff", "a"),  # the second spelled as an indefinite string
    ("a2f600f600", None), ("a2190001001b000000000000000100", 1),  # the same key with another head
])
def test_duplicate_keys_are_refused(hexed: str, key: object) -> None:
    error = _refused(hexed, "appears twice|are one key", DuplicateKey)
    assert isinstance(error, DuplicateKey) and error.key == key


def test_keys_equal_only_in_python_are_refused_and_distinct_types_are_not() -> None:
    _refused("a20100f500", "the map keys 1 and True are one key to Python", DuplicateKey)
    _refused("a200f4f400", "are one key", DuplicateKey)
    assert _decode("a3416100616100010f") == {b"a": 0, "a": 0, 1: 15}


@pytest.mark.parametrize(("hexed", "kind"), [
    ("a18000", "an array"), ("a1a000", "a map"), ("a1d28000", "a tag"), ("a1f93c0000", "a float"),
    ("bf9fff00ff", "an array"),
])
def test_keys_are_scalars(hexed: str, kind: str) -> None:
    _refused(hexed, kind, tags={18})


def test_depth() -> None:
    assert decode(bytes.fromhex("8100"), max_depth=1) == [0]
    assert decode(bytes.fromhex("818100"), max_depth=2) == [[0]]
    _refused("818100", "nested deeper than 1 at offset 1", max_depth=1)
    _refused("a100a100f6", "nested deeper than 1", max_depth=1)
    _refused("d2d280", "nested deeper than 2", max_depth=2, tags={18})  # a tag is a level too
    assert decode(b"\x00", max_depth=0) == 0
    with pytest.raises(CborError, match="nested deeper than 8"):
        decode(b"\x81" * 100_000 + b"\x00", max_depth=8)  # never a RecursionError


def test_trailing_bytes() -> None:
    _refused("0000", "^1 trailing byte after the item at offset 1$")
    _refused("80000102", "^3 trailing bytes after the item at offset 1$")
    _refused("9fff00", "trailing byte")


@pytest.mark.parametrize("hexed", ["62c328", "61ff", "63eda080", "7f61c361a9ff", "7f62c3bc61c3ff", "a162c3280000"])
def test_text_must_be_utf8_chunk_by_chunk(hexed: str) -> None:
    _refused(hexed, "a text string is not UTF-8")


@pytest.mark.parametrize("hexed", ["5f6161ff", "7f4161ff", "5f5f4100ffff", "7f7fffff", "5f00ff", "5f80ff", "5fa0ff", "5ff6ff"])
def test_indefinite_string_chunks_are_definite_strings_of_the_same_type(hexed: str) -> None:
    _refused(hexed, "a chunk of an indefinite-length string")


@pytest.mark.parametrize(("hexed", "match"), [
    ("ff", "a break"), ("81ff", "a break"), ("a1ff00", "a break"), ("a101ff", "a break"), ("bf01ff", "a break"),
    ("8201ff", "a break"), ("d2ff", "a break"),
    ("9f01", "no break"), ("bf", "no break"), ("bf0102", "no break"), ("5f4100", "no break"), ("7f", "no break"),
    ("1c", "0x1c"), ("1d", "0x1d"), ("1e", "0x1e"), ("1f", "0x1f"), ("3f", "0x3f"), ("5c", "0x5c"), ("9d", "0x9d"),
    ("bc", "0xbc"), ("dc", "0xdc"), ("df", "0xdf"), ("fc", "0xfc"), ("fe", "0xfe"),
    ("", "truncated at offset 0"), ("18", "truncated"), ("1b00000000", "truncated"), ("82190001", "truncated at offset 4"),
    ("a201", "more items than"), ("a1190001", "truncated at offset 4"),
])
def test_malformed(hexed: str, match: str) -> None:
    _refused(hexed, match, tags={18})


@pytest.mark.parametrize("hexed", [
    "5b7fffffffffffffff", "7bffffffffffffffff", "5affffffff00", "9b7fffffffffffffff", "bbffffffffffffffff",
    "9a7fffffff", "ba40000000", "5f5b7fffffffffffffffff", "d29b7fffffffffffffff", "bf00bb7fffffffffffffffff",
])
def test_a_huge_declared_length_fails_before_allocating(hexed: str) -> None:
    tracemalloc.start()
    try:
        with pytest.raises(CborError, match=r"runs past the end|more items than"):
            _decode(hexed, tags={18})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024


def test_errors_name_the_offset_and_the_path() -> None:
    data = cbor2.dumps({"pcrs": {0: b"x", 3: [1, 2]}, "timestamp": 1})[:-1] + b"\xfb"
    with pytest.raises(CborError) as e:
        decode(data + bytes(8), max_depth=4)
    assert e.value.path == ["timestamp"] and e.value.offset == len(data) - 1
    assert str(e.value).endswith(f"at offset {len(data) - 1} (in timestamp)")
    with pytest.raises(CborError, match=r"\(in pcrs\[3\]\[1\]\)"):
        decode(cbor2.dumps({"pcrs": {0: b"x", 3: [1, 2.5]}}), max_depth=4)
    with pytest.raises(CborError, match=r"\(in \[b'k'\]\[0\]\.DescribePCR\)"):
        decode(cbor2.dumps({b"k": [{"DescribePCR": 1.5}]}), max_depth=4)


def test_bytes_like_input() -> None:
    assert decode(bytearray(b"\x82\x01\x41\x02"), max_depth=1) == [1, b"\x02"]
    assert decode(memoryview(b"\x00\x63abc")[1:], max_depth=1) == "abc"


# --- real documents ------------------------------------------------------------------------------

VECTORS = [*REAL, *DERIVED]


def _items(data: bytes) -> list[bytes]:
    """A document and the CBOR inside it: the protected header and the payload."""
    top = cbor2.loads(data)
    array = top.value if isinstance(top, cbor2.CBORTag) else top
    return [data, array[0], array[2]]


def _plain(value: Any) -> Any:
    """cbor2's value with its CBORTag as a Tagged, and a tag's content as lists and dicts (cbor2 makes
    it immutable: tuples and frozendicts), to compare with ours."""
    if isinstance(value, cbor2.CBORTag):
        return Tagged(value.tag, _plain(value.value))
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


@pytest.mark.parametrize("path", VECTORS, ids=lambda p: p.name)
def test_real_documents_decode_as_cbor2_decodes_them(path: Any) -> None:
    for data in _items(path.read_bytes()):
        assert repr(decode(data, max_depth=8, tags={18})) == repr(_plain(cbor2.loads(data)))


@pytest.mark.parametrize("path", VECTORS[:3] + [p for p in VECTORS if "indef" in p.name], ids=lambda p: p.name)
def test_real_documents_truncated_anywhere_are_refused(path: Any) -> None:
    for data in _items(path.read_bytes()):
        for end in range(len(data)):
            with pytest.raises(CborError):
                decode(data[:end], max_depth=8, tags={18})


# --- properties ----------------------------------------------------------------------------------

INTEGERS = st.integers(-(2**64), 2**64 - 1)
SCALARS = st.none() | st.booleans() | INTEGERS | st.binary(max_size=40) | st.text(max_size=20)
KEYS = st.none() | st.booleans() | INTEGERS | st.binary(max_size=8) | st.text(max_size=8)
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(KEYS, inner, max_size=5),
                      max_leaves=25)


@given(VALUES)
def test_random_cbor_decodes_as_cbor2_decodes_it(value: object) -> None:
    data = cbor2.dumps(value)
    assert repr(decode(data, max_depth=64)) == repr(cbor2.loads(data)) == repr(value)


@given(st.binary(max_size=512), st.integers(0, 10), st.sampled_from([(), (18,), (2, 18, 35)]))
@example(b"\xd2" * 100 + b"\x80", 8, (18,))
@example(b"\xbf" * 50 + b"\xff" * 50, 8, ())
@example(b"\x5f\x5b" + b"\xff" * 8, 8, ())
@example(b"\xa2\x01\x00\x01", 8, ())  # the second key at the end
def test_any_bytes_give_a_value_or_a_cbor_error(data: bytes, max_depth: int, tags: tuple[int, ...]) -> None:
    try:
        decode(data, max_depth=max_depth, tags=tags)
    except CborError as e:
        assert str(e) and 0 <= e.offset <= len(data)


@given(st.sampled_from(VECTORS), st.integers(min_value=0), st.integers(0, 255))
def test_real_documents_with_a_byte_changed_give_a_value_or_a_cbor_error(path: Any, position: int, value: int) -> None:
    data = bytearray(path.read_bytes())
    data[position % len(data)] = value
    with contextlib.suppress(CborError):
        decode(bytes(data), max_depth=8, tags={18})
