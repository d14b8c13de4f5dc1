"""`AttestationError`: a document refused, with a stable code and the name of the check that refused it.

Codes (the first check that fails, in verification order):

=================  ============  ===============================================================
code               check         meaning
=================  ============  ===============================================================
E_SIZE             cbor          the input is larger than any attestation document can be
E_CBOR             cbor          not one complete CBOR item (truncated, malformed, trailing bytes, a float)
E_TAG              envelope      a CBOR tag other than 18 around the whole envelope (COSE_Sign1)
E_COSE_STRUCT      envelope      not a 4-element array of the right types, or the payload size
E_PROTECTED        protected     the protected header is not exactly ``{1: -35}`` (ES384)
E_SIG_LEN          envelope      the signature is not the 96 bytes of a raw ES384 ``r ‖ s``
E_PAYLOAD_CBOR     payload       the payload is not one CBOR map, or holds a float or a tag
E_DUPLICATE        payload       a map key appears twice (the payload, pcrs, the protected header)
E_FIELD_UNKNOWN    payload       a key other than the nine fields
E_FIELD_MISSING    payload       a mandatory field is absent or null
E_FIELD_TYPE       payload       a field has the wrong CBOR type
E_FIELD_VALUE      payload       a field has the right type but a wrong value or size
E_ROOT             root          cabundle[0] is not a trusted root
E_CHAIN            chain         a certificate is malformed, misissued or breaks the chain rules
E_CERT_TIME        validity      a certificate is not valid at the chosen instant
E_SIGNATURE        signature     the COSE signature does not verify with the leaf's key
E_PCR              pcrs          a PCR differs from the expected one, or the enclave is in debug mode
E_DEBUG            debug         a debug-mode enclave, and debug documents are refused
E_NONCE            nonce         the nonce is not the expected one
E_USER_DATA        user-data     user_data is not the expected one
E_PUBLIC_KEY       public-key    public_key is not the expected one
=================  ============  ===============================================================
"""

from __future__ import annotations

from enclaver_rules.errors import EnclaverError

#: code -> the check that raises it (one place; `verify` orders its report by these check names)
CHECK_OF = {
    "E_SIZE": "cbor", "E_CBOR": "cbor",
    "E_TAG": "envelope", "E_COSE_STRUCT": "envelope", "E_SIG_LEN": "envelope",
    "E_PROTECTED": "protected",
    "E_PAYLOAD_CBOR": "payload", "E_DUPLICATE": "payload", "E_FIELD_UNKNOWN": "payload",
    "E_FIELD_MISSING": "payload", "E_FIELD_TYPE": "payload", "E_FIELD_VALUE": "payload",
    "E_ROOT": "root", "E_CHAIN": "chain", "E_CERT_TIME": "validity", "E_SIGNATURE": "signature",
    "E_PCR": "pcrs", "E_DEBUG": "debug", "E_NONCE": "nonce", "E_USER_DATA": "user-data",
    "E_PUBLIC_KEY": "public-key",
}


class AttestationError(EnclaverError):
    """An attestation document refused. `code` is one of `CHECK_OF`'s keys, `check` the check's name.

    The check name also fills the diagnostic's `field`, so the CLI prints ``check: message — fix``.
    """

    def __init__(self, code: str, message: str, *, fix: str = "", file: str = "") -> None:
        if code not in CHECK_OF:
            raise ValueError(f"unknown attestation error code {code!r}")
        self.code = code
        self.check = CHECK_OF[code]
        self.detail = message
        super().__init__(message, file=file, field=self.check, fix=fix)
