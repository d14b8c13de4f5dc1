"""`CiphertextForRecipient`: the CMS EnvelopedData KMS returns for a `Recipient`, built and opened.

One implementation for both ends (design.md: a second copy of CMS logic is a defect): the local KMS
builds it, odyn's KMS proxy opens it. The layout is the one of every KMS-labelled vector
(kms-recipient notes §2.1, checked with `openssl asn1parse` and asn1crypto there):

    ContentInfo SEQUENCE (BER, indefinite length)
      contentType id-envelopedData
      [0] EXPLICIT (indefinite)
        EnvelopedData SEQUENCE (indefinite)
          version 2
          recipientInfos SET (definite) OF exactly one
            KeyTransRecipientInfo: version 2, rid [0] subjectKeyIdentifier = SHA-256(DER SPKI),
              RSAES-OAEP (SHA-256, MGF1-SHA-256, NULL parameters written out), encryptedKey
          encryptedContentInfo SEQUENCE (indefinite)
            contentType id-data, aes256-CBC with a 16-byte IV,
            encryptedContent [0] (constructed, indefinite: OCTET STRING chunks)

`build_enveloped` writes exactly that, byte for byte in KMS's encoding (indefinite lengths where KMS
uses them; the recipient SET and everything inside it DER, as in the vectors). `open_enveloped` is
strict (notes §2.2): every algorithm and version is checked and anything else is refused rather than
tried (no SHA-1 OAEP, no other cipher), and it accepts `encryptedContent` both as constructed chunks
and as one primitive string, as KMS-labelled vectors carry both. Hostile bytes give `CmsError`, never
another exception. Pure: asn1crypto (cryptography cannot read KMS's BER, notes §2.3) and cryptography's
primitives.
"""

from __future__ import annotations

import hashlib
import os

from asn1crypto import algos, cms, core
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives import padding as symmetric_padding
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

#: the largest CiphertextForRecipient opened (KMS's `CiphertextType` is at most 6144 bytes)
MAX_BLOB = 64 * 1024
#: the largest plaintext sealed: what still gives an envelope `open_enveloped` accepts
MAX_PLAINTEXT = MAX_BLOB - 2048
MIN_RSA_BITS = 2048  # what the Nitro SDK asks for (RecipientRequest.md); KMS's own lower bound: UNCONFIRMED
MAX_RSA_BITS = 8192  # an NSM document's public_key is at most 1024 bytes, ~8000 bits
MAX_PUBLIC_KEY = 4096
CEK_SIZE = 32
IV_SIZE = 16
BLOCK = 16

ENVELOPED_DATA = "1.2.840.113549.1.7.3"
DATA = "1.2.840.113549.1.7.1"
RSAES_OAEP = "1.2.840.113549.1.1.7"
MGF1 = "1.2.840.113549.1.1.8"
SHA256 = "2.16.840.1.101.3.4.2.1"
AES256_CBC = "2.16.840.1.101.3.4.1.42"
P_SPECIFIED = "1.2.840.113549.1.1.9"

_OAEP = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
_SHA256 = {"algorithm": "sha256", "parameters": core.Null()}  # with the explicit NULL, as KMS writes it
#: The recipient's keyEncryptionAlgorithm: RSAES-OAEP, SHA-256 and MGF1-SHA-256 (the same in every answer).
_KEY_ENCRYPTION: bytes = cms.KeyEncryptionAlgorithm({"algorithm": "rsaes_oaep", "parameters": algos.RSAESOAEPParams(
    {"hash_algorithm": _SHA256, "mask_gen_algorithm": {"algorithm": "mgf1", "parameters": _SHA256}})}).dump()
_V2: bytes = core.Integer(2).dump()
#: what asn1crypto or cryptography raise on malformed input; each becomes a CmsError
_MALFORMED = (ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError, RecursionError,
              NotImplementedError, UnsupportedAlgorithm)


class CmsError(ValueError):
    """A CiphertextForRecipient that cannot be built or opened; the message says which part is wrong."""


# --- building ------------------------------------------------------------------------------------


def build_enveloped(plaintext: bytes, recipient_public_key_der: bytes) -> bytes:
    """`plaintext` sealed for the RSA key whose DER SubjectPublicKeyInfo is given, exactly as KMS
    writes CiphertextForRecipient. CmsError for a key that is not RSA of 2048..8192 bits."""
    public_key = load_recipient_key(recipient_public_key_der)
    if len(plaintext) > MAX_PLAINTEXT:
        raise CmsError(f"{len(plaintext)} bytes of plaintext is more than the {MAX_PLAINTEXT} an envelope may carry")
    spki = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    cek, iv = os.urandom(CEK_SIZE), os.urandom(IV_SIZE)
    padder = symmetric_padding.PKCS7(128).padder()
    padded = padder.update(plaintext) + padder.finalize()
    encryptor = Cipher(algorithms.AES(cek), modes.CBC(iv)).encryptor()
    ciphertext = encryptor.update(padded) + encryptor.finalize()

    # KeyTransRecipientInfo v2, each field dumped by asn1crypto; the SEQUENCE and SET around them are
    # joined here because asn1crypto re-encodes a nested structure on dump (~2.7 ms a call, measured by
    # benchmarks/kms_roundtrip.py); the bytes are the same (tests/test_kms_cms.py compares them)
    rid = cms.RecipientIdentifier(name="subject_key_identifier", value=hashlib.sha256(spki).digest()).dump()
    ktri = _definite(b"\x30", _V2 + rid + _KEY_ENCRYPTION + core.OctetString(public_key.encrypt(cek, _OAEP)).dump())
    recipients = _definite(b"\x31", ktri)
    cipher = algos.EncryptionAlgorithm({"algorithm": "aes256_cbc", "parameters": iv}).dump()
    content = _indefinite(b"\xa0", _definite(b"\x04", ciphertext))  # [0] IMPLICIT OCTET STRING, constructed
    encrypted_content_info = _indefinite(b"\x30", _oid(DATA), cipher, content)
    enveloped = _indefinite(b"\x30", core.Integer(2).dump(), recipients, encrypted_content_info)
    return _indefinite(b"\x30", _oid(ENVELOPED_DATA), _indefinite(b"\xa0", enveloped))


def load_recipient_key(der: bytes) -> rsa.RSAPublicKey:
    """The RSA key of a DER SubjectPublicKeyInfo (an attestation document's public_key); CmsError
    unless it is RSA of 2048..8192 bits."""
    if not isinstance(der, bytes | bytearray) or not 0 < len(der) <= MAX_PUBLIC_KEY:
        raise CmsError(f"the recipient's public key must be a DER SubjectPublicKeyInfo of 1..{MAX_PUBLIC_KEY} bytes")
    try:
        key = serialization.load_der_public_key(bytes(der))
    except _MALFORMED as e:
        raise CmsError(f"the recipient's public key is not a DER SubjectPublicKeyInfo ({e})") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise CmsError(f"the recipient's public key is {type(key).__name__.removeprefix('_')}, not RSA: KMS's "
                       f"RSAES_OAEP_SHA_256 needs an RSA key")
    if not MIN_RSA_BITS <= key.key_size <= MAX_RSA_BITS:
        raise CmsError(f"the recipient's RSA key has {key.key_size} bits; {MIN_RSA_BITS}..{MAX_RSA_BITS} are accepted")
    return key


def _length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def _definite(tag: bytes, content: bytes) -> bytes:
    return tag + _length(len(content)) + content


def _indefinite(tag: bytes, *parts: bytes) -> bytes:
    """A constructed element with an indefinite length: tag, 0x80, the parts, end-of-contents."""
    return tag + b"\x80" + b"".join(parts) + b"\x00\x00"


def _oid(dotted: str) -> bytes:
    der: bytes = core.ObjectIdentifier(dotted).dump()
    return der


# --- opening -------------------------------------------------------------------------------------


def open_enveloped(blob: bytes, private_key: rsa.RSAPrivateKey) -> bytes:
    """The plaintext of a CiphertextForRecipient sealed for `private_key` (notes §2.2, strictly).
    CmsError, whose message names the part that is wrong, for anything else."""
    if not isinstance(blob, bytes | bytearray | memoryview):
        raise CmsError(f"CiphertextForRecipient must be bytes, not {type(blob).__name__}")
    if not 0 < len(blob) <= MAX_BLOB:
        raise CmsError(f"CiphertextForRecipient is {len(blob)} bytes; 1..{MAX_BLOB} are accepted")
    try:
        encrypted_key, iv, ciphertext = _parse(bytes(blob))
    except CmsError:
        raise
    except _MALFORMED as e:
        raise CmsError(f"CiphertextForRecipient is not well-formed BER/CMS ({type(e).__name__}: {str(e)[:200]})") \
            from None
    if len(encrypted_key) != (private_key.key_size + 7) // 8:
        raise CmsError(f"the encrypted key is {len(encrypted_key)} bytes, not the {(private_key.key_size + 7) // 8} "
                       f"of this RSA-{private_key.key_size} key: sealed for another key")
    try:
        cek = private_key.decrypt(encrypted_key, _OAEP)
    except ValueError:
        raise CmsError("the encrypted key does not decrypt with this private key (RSAES-OAEP SHA-256): sealed for "
                       "another key, or altered") from None
    if len(cek) != CEK_SIZE:
        raise CmsError(f"the content-encryption key is {len(cek)} bytes, not the {CEK_SIZE} of AES-256")
    decryptor = Cipher(algorithms.AES(cek), modes.CBC(iv)).decryptor()
    padded = decryptor.update(ciphertext) + decryptor.finalize()
    try:
        unpadder = symmetric_padding.PKCS7(128).unpadder()
        return unpadder.update(padded) + unpadder.finalize()
    except ValueError:
        raise CmsError("the decrypted content has no valid PKCS#7 padding: altered, or a wrong key") from None


def _parse(blob: bytes) -> tuple[bytes, bytes, bytes]:
    """(encryptedKey, IV, encryptedContent) after every structural check."""
    info = cms.ContentInfo.load(blob, strict=True)
    if info["content_type"].dotted != ENVELOPED_DATA:
        raise CmsError(f"contentType is {info['content_type'].dotted}, not id-envelopedData ({ENVELOPED_DATA})")
    enveloped = info["content"]
    if not isinstance(enveloped, cms.EnvelopedData):
        raise CmsError("the content is not an EnvelopedData")
    _version(enveloped, "EnvelopedData")
    for name in ("originator_info", "unprotected_attrs"):
        if not isinstance(enveloped[name], core.Void):
            raise CmsError(f"EnvelopedData carries {name}, which KMS never sends")
    recipients = enveloped["recipient_infos"]
    if len(recipients) != 1:
        raise CmsError(f"EnvelopedData has {len(recipients)} recipients; KMS sends exactly one")
    recipient = recipients[0]
    if recipient.name != "ktri":
        raise CmsError(f"the recipient is a {recipient.name}, not a KeyTransRecipientInfo")
    ktri = recipient.chosen
    _version(ktri, "KeyTransRecipientInfo")
    if ktri["rid"].name != "subject_key_identifier":
        raise CmsError("the recipient is identified by issuer and serial number, not by subjectKeyIdentifier "
                       "(required with version 2)")
    _oaep(ktri["key_encryption_algorithm"])
    encrypted_key = ktri["encrypted_key"].native

    content_info = enveloped["encrypted_content_info"]
    if content_info["content_type"].dotted != DATA:
        raise CmsError(f"the encrypted content type is {content_info['content_type'].dotted}, not id-data ({DATA})")
    algorithm = content_info["content_encryption_algorithm"]
    if algorithm["algorithm"].dotted != AES256_CBC:
        raise CmsError(f"the content cipher is {algorithm['algorithm'].dotted}, not aes256-CBC ({AES256_CBC})")
    iv = algorithm["parameters"]
    if not isinstance(iv, core.OctetString) or len(iv.native) != IV_SIZE:
        raise CmsError(f"the aes256-CBC IV must be an OCTET STRING of {IV_SIZE} bytes")
    ciphertext = content_info["encrypted_content"].native
    if not isinstance(ciphertext, bytes) or not ciphertext or len(ciphertext) % BLOCK:
        size = len(ciphertext) if isinstance(ciphertext, bytes) else 0
        raise CmsError(f"the encrypted content is {size} bytes; AES-CBC needs a positive multiple of {BLOCK}")
    if not isinstance(encrypted_key, bytes):
        raise CmsError("the encrypted key is missing")
    return encrypted_key, iv.native, ciphertext


def _version(value: core.Sequence, what: str) -> None:
    version = value["version"].native
    if version != "v2":
        raise CmsError(f"{what} version is {version}; KMS writes version 2")


def _oaep(algorithm: cms.KeyEncryptionAlgorithm) -> None:
    if algorithm["algorithm"].dotted != RSAES_OAEP:
        raise CmsError(f"the key encryption is {algorithm['algorithm'].dotted}, not RSAES-OAEP ({RSAES_OAEP})")
    params = algorithm["parameters"]
    if not isinstance(params, algos.RSAESOAEPParams):
        raise CmsError("RSAES-OAEP has no parameters: the default would be SHA-1, which KMS never uses")
    _sha256(params["hash_algorithm"], "the OAEP hash")
    mask = params["mask_gen_algorithm"]
    if mask["algorithm"].dotted != MGF1:
        raise CmsError(f"the OAEP mask generation is {mask['algorithm'].dotted}, not MGF1 ({MGF1})")
    _sha256(mask["parameters"], "the MGF1 hash")
    source = params["p_source_algorithm"]
    if source["algorithm"].dotted != P_SPECIFIED or source["parameters"].native != b"":
        raise CmsError("the OAEP label is not empty (pSourceFunc must be pSpecifiedEmpty)")


def _sha256(digest: algos.DigestAlgorithm, what: str) -> None:
    if not isinstance(digest, algos.DigestAlgorithm) or digest["algorithm"].dotted != SHA256:
        got = digest["algorithm"].dotted if isinstance(digest, algos.DigestAlgorithm) else "absent"
        raise CmsError(f"{what} is {got}, not SHA-256 ({SHA256}); anything else is refused, SHA-1 included")
    if not isinstance(digest["parameters"], core.Null | core.Void):  # RFC 4055: NULL or absent
        raise CmsError(f"{what} has parameters; SHA-256 takes NULL or none")
