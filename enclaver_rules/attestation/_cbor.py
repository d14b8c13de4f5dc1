"""`decode_exact`: the attestation verifier's CBOR decodes, `cbor_strict`'s errors as AttestationError codes."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from enclaver_rules.attestation import cbor_strict
from enclaver_rules.attestation.errors import AttestationError

#: deep enough for every real structure (tag 18, the array, its unprotected map; the payload nests 2
#: levels), shallow enough to bound recursion
MAX_DEPTH = 8


def decode_exact(data: bytes, *, what: str, code: str, tags: Collection[int] = (), tag_code: str = "") -> Any:
    """The one CBOR item `data` holds, with no byte left over, read by `cbor_strict`.

    Failures raise `AttestationError(code)` naming `what`, except a repeated map key (E_DUPLICATE:
    two readers of the same bytes must never see different values) and, when `tag_code` is given,
    a tag other than `tags` around the whole item (`tag_code`).
    """
    try:
        return cbor_strict.decode(data, max_depth=MAX_DEPTH, tags=tags)
    except cbor_strict.DuplicateKey as e:
        raise AttestationError("E_DUPLICATE", f"{what}: {e}", fix="a map key may appear only once") from None
    except cbor_strict.TagNotAllowed as e:
        raise AttestationError(tag_code or code, f"{what}: {e}") from None
    except cbor_strict.CborError as e:
        raise AttestationError(code, f"{what}: not CBOR an attestation document may hold ({e})") from None
