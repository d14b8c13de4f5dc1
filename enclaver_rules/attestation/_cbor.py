"""Strict decoding of one CBOR item from hostile bytes: the one place cbor2 reads attestation input.

cbor2's defaults are lenient where a verifier must not be: `loads` ignores trailing bytes and keeps
the last of two equal map keys. Here the decoder refuses duplicate keys, limits nesting, and the
stream position is compared with the length, so exactly one complete item is accepted.
"""

from __future__ import annotations

import io
from typing import Any

import cbor2

from enclaver_rules.attestation.errors import AttestationError

#: deep enough for every real structure (the payload nests 2 levels), shallow enough to bound recursion
MAX_DEPTH = 8
#: cbor2's message for a repeated key (it has no exception class of its own)
_DUPLICATE = "Duplicate map key"


def decode_exact(data: bytes, *, what: str, code: str) -> Any:
    """The one CBOR item `data` holds, with no byte left over.

    Failures raise `AttestationError(code)` naming `what`, except duplicate map keys (E_DUPLICATE):
    two readers of the same bytes must never see different values.
    """
    stream = io.BytesIO(data)
    decoder = cbor2.CBORDecoder(stream, allow_duplicate_keys=False, max_depth=MAX_DEPTH)
    try:
        item = decoder.decode()
    except cbor2.CBORDecodeError as e:
        message = _short(str(e))
        if _DUPLICATE in message:
            raise AttestationError("E_DUPLICATE", f"{what}: {message.split(': ', 1)[-1]}",
                                   fix="a map key may appear only once") from None
        raise AttestationError(code, f"{what}: not decodable CBOR ({message})") from None
    except (ValueError, TypeError, OverflowError, LookupError, RecursionError) as e:
        # semantic tags (dates, bignums, decimals, sets…) decode to Python objects whose own
        # constructors can fail on hostile content
        raise AttestationError(code, f"{what}: not decodable CBOR ({type(e).__name__})") from None
    left = len(data) - stream.tell()
    if left:
        raise AttestationError(code, f"{what}: {left} trailing bytes after the CBOR item")
    return item


def _short(text: str, limit: int = 160) -> str:
    """cbor2 quotes the offending value; a hostile value may be long."""
    return text if len(text) <= limit else text[:limit] + "…"
