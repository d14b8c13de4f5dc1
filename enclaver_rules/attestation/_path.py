"""The certificate checks of a document: root, chain, validity (reference §5 step 3). No CRL (AWS uses none).

Each function raises `AttestationError` with its own code, so a report says which rule broke and where:
``certificate`` is the leaf, ``cabundle[i]`` a CA (``cabundle[0]`` the root). The rules are explicit
here (messages a person can act on); cryptography's own path validator then runs as a second net.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509 import verification
from cryptography.x509.oid import SignatureAlgorithmOID

from enclaver_rules.attestation.document import AttestationDocument, iso
from enclaver_rules.attestation.errors import AttestationError

_E = TypeVar("_E", bound=x509.ExtensionType)
#: what cryptography raises on malformed certificates (a few of its exceptions derive from Exception only)
_BROKEN = (ValueError, TypeError, UnsupportedAlgorithm, x509.InvalidVersion, x509.DuplicateExtension,
           x509.UnsupportedGeneralNameType)


@dataclass(frozen=True, slots=True)
class Path:
    """The path to validate, leaf first: ``[certificate, cabundle[N-1], …, cabundle[0]]``, with names."""

    certs: tuple[x509.Certificate, ...]
    names: tuple[str, ...]
    root: x509.Certificate  # the trusted root cabundle[0] equals

    @property
    def leaf(self) -> x509.Certificate:
        return self.certs[0]


def anchor(doc: AttestationDocument, roots: Sequence[x509.Certificate]) -> x509.Certificate:
    """The trusted root `cabundle[0]` is, byte for byte (never a root taken from the document)."""
    for root in roots:
        if root.public_bytes(Encoding.DER) == doc.cabundle[0]:
            return root
    names = ", ".join(sorted({r.subject.rfc4514_string() for r in roots})) or "none"
    raise AttestationError("E_ROOT", f"cabundle[0] is not a trusted root (trusted: {names})",
                           fix="a document from a real enclave chains to AWS's root; a simulated one to its "
                               "simulator's root (pass it with --root)")


def build(doc: AttestationDocument, root: x509.Certificate) -> Path:
    """Parse every certificate; E_CHAIN names the one that is not DER X.509."""
    named = [("certificate", doc.certificate)] + [(f"cabundle[{i}]", c) for i, c in reversed(list(enumerate(doc.cabundle)))]
    certs = []
    for name, der in named:
        try:
            # what cryptography still loads with a deprecation warning (a serial number ≤ 0) is refused now
            with warnings.catch_warnings(action="error", category=CryptographyDeprecationWarning):
                certs.append(x509.load_der_x509_certificate(der))
        except (*_BROKEN, CryptographyDeprecationWarning) as e:
            raise AttestationError("E_CHAIN", f"{name} is not a DER X.509 certificate ({e})") from None
    return Path(tuple(certs), tuple(n for n, _ in named), root)


def check_chain(path: Path) -> str:
    """Keys, algorithms, links and extensions of every certificate; returns a one-line summary."""
    try:
        _check_algorithms(path)
        _check_links(path)
        _check_extensions(path)
        _net(path)
    except _BROKEN as e:
        raise AttestationError("E_CHAIN", f"a certificate cannot be read: {e}") from None
    return f"{len(path.certs)} certificates, P-384/ecdsa-with-SHA384, links and extensions valid"


def _check_algorithms(path: Path) -> None:
    for cert, name in zip(path.certs, path.names, strict=True):
        if cert.version is not x509.Version.v3:
            raise AttestationError("E_CHAIN", f"{name} is X.509 {cert.version.name}, must be v3")
        key = cert.public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP384R1):
            kind = key.curve.name if isinstance(key, ec.EllipticCurvePublicKey) else type(key).__name__
            raise AttestationError("E_CHAIN", f"{name} has a {kind} key, must be ECDSA P-384")
        if cert.signature_algorithm_oid != SignatureAlgorithmOID.ECDSA_WITH_SHA384:
            raise AttestationError("E_CHAIN", f"{name} is signed with {cert.signature_algorithm_oid.dotted_string}, "
                                              "must be ecdsa-with-SHA384")


def _check_links(path: Path) -> None:
    for child, parent, child_name, parent_name in zip(path.certs, path.certs[1:], path.names, path.names[1:],
                                                      strict=False):
        try:
            child.verify_directly_issued_by(parent)
        except (*_BROKEN, InvalidSignature):
            raise AttestationError("E_CHAIN", f"{child_name} is not issued/signed by {parent_name}",
                                   fix="the cabundle must be the chain that issued the certificate, root first") from None


def _check_extensions(path: Path) -> None:
    """basicConstraints and keyUsage as AWS lists them: CAs may sign certificates, within their pathLen;
    the leaf is no CA and signs (digitalSignature)."""
    leaf, *cas = path.certs
    for below, (cert, name) in enumerate(zip(cas, path.names[1:], strict=True)):
        constraints = _extension(cert, x509.BasicConstraints)
        if constraints is None or not constraints.ca:
            raise AttestationError("E_CHAIN", f"{name} is not a CA (basicConstraints CA:true missing)")
        if constraints.path_length is not None and below > constraints.path_length:
            raise AttestationError("E_CHAIN", f"{name} allows {constraints.path_length} CAs below it (pathLen), "
                                              f"the chain has {below}")
        usage = _extension(cert, x509.KeyUsage)
        if usage is None or not usage.key_cert_sign:
            raise AttestationError("E_CHAIN", f"{name} may not sign certificates (keyUsage keyCertSign missing)")
    constraints = _extension(leaf, x509.BasicConstraints)
    if constraints is not None and constraints.ca:
        raise AttestationError("E_CHAIN", "certificate (the leaf) is a CA (basicConstraints CA:true), must not be")
    usage = _extension(leaf, x509.KeyUsage)
    if usage is None or not usage.digital_signature:
        raise AttestationError("E_CHAIN", "certificate (the leaf) may not sign (keyUsage digitalSignature missing)")


def _extension(cert: x509.Certificate, kind: type[_E]) -> _E | None:
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def _net(path: Path) -> None:
    """cryptography's RFC 5280 path validation, at an instant at which every certificate is valid (the
    requested instant is `check_validity`'s job, with its own code). Its web-PKI defaults stay on for the
    CAs; for the leaf we accept a missing AuthorityKeyIdentifier and SubjectAlternativeName, which AWS's
    leaves lack (a document's leaf is no TLS certificate and has no name to match)."""
    start = max(c.not_valid_before_utc for c in path.certs)
    if start > min(c.not_valid_after_utc for c in path.certs):
        raise AttestationError("E_CHAIN", "the certificates' validity periods do not overlap: the chain was "
                                          "never valid at any instant")
    leaf_policy = (verification.ExtensionPolicy.webpki_defaults_ee()
                   .may_be_present(x509.AuthorityKeyIdentifier, verification.Criticality.AGNOSTIC, None)
                   .may_be_present(x509.SubjectAlternativeName, verification.Criticality.AGNOSTIC, None))
    verifier = (verification.PolicyBuilder().store(verification.Store([path.root])).time(start)
                .extension_policies(ca_policy=verification.ExtensionPolicy.webpki_defaults_ca(), ee_policy=leaf_policy)
                .build_client_verifier())
    try:
        verifier.verify(path.leaf, list(path.certs[1:-1]))
    except verification.VerificationError as e:
        raise AttestationError("E_CHAIN", f"the chain breaks RFC 5280: {e}") from None


def check_validity(path: Path, at: datetime) -> str:
    """Every certificate, the root included, valid at `at`; E_CERT_TIME names each one that is not."""
    expired = [f"{name} is valid {_second(c.not_valid_before_utc)} … {_second(c.not_valid_after_utc)}"
               for c, name in zip(path.certs, path.names, strict=True)
               if not c.not_valid_before_utc <= at <= c.not_valid_after_utc]
    if expired:
        raise AttestationError("E_CERT_TIME", f"not valid at {iso(at)}: " + "; ".join(expired),
                               fix="a leaf lives 3 hours: check a stored document at its own timestamp")
    leaf = path.leaf
    return f"all valid at {iso(at)} (the leaf {_second(leaf.not_valid_before_utc)} … {_second(leaf.not_valid_after_utc)})"


def _second(moment: datetime) -> str:
    """A certificate's time: whole seconds is all X.509 holds."""
    return iso(moment).replace(".000Z", "Z")
