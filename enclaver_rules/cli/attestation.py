"""`enclaver attestation verify DOC`: is this attestation document genuine, current and the expected enclave?

Parsing flags, reading files and printing only; the procedure is `enclaver_rules.attestation.verify`.
Other sub-commands of the group (the simulator's CA, the simulated NSM) plug in through
`EXTRA_SUBCOMMANDS`.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from enclaver_rules.cli.exit_codes import ExitCode
from enclaver_rules.cli.options import Subparsers, add_json, command, command_group
from enclaver_rules.errors import EnclaverError, InvalidInput

if TYPE_CHECKING:
    from datetime import datetime

    from cryptography import x509

    from enclaver_rules.attestation.verify import Report
    from enclaver_rules.cli.output import Output

#: Hooks adding more `enclaver attestation` sub-commands: each gets the group's sub-parsers and the
#: common flags parser, like `add_parser` does.
EXTRA_SUBCOMMANDS: list[Callable[[Subparsers[argparse.ArgumentParser], argparse.ArgumentParser], None]] = []

MAX_INPUT = 64 * 1024
MAX_FILE = 1 << 20  # a roots PEM or a measurements file
#: failure codes meaning no complete CBOR item could be read: the input is unusable (2), not a refused document (1)
UNREADABLE = frozenset({"E_CBOR", "E_SIZE"})
_TEXT = re.compile(rb"[A-Za-z0-9+/=_\-\s]+")
_HEX = re.compile(rb"(?:[0-9A-Fa-f]{2})+")

VERIFY_CODES = {
    ExitCode.OK: "the document is genuine and every check passed",
    ExitCode.FAILURE: "the document was read and refused: the output names the check that failed",
    ExitCode.INVALID_INPUT: "unusable input: DOC is missing, larger than 64 KiB, neither CBOR nor base64/hex, or "
                            "not one complete CBOR item (truncated, trailing bytes); or a flag, --root or "
                            "--expect is invalid",
}
DESCRIPTION = (
    "Check an AWS Nitro Enclaves attestation document (a COSE_Sign1, as the NSM returns it): its CBOR envelope "
    "and fields, that its certificate chain leads to the trusted root (AWS's, bundled and pinned by "
    "fingerprint; --root replaces it), that every certificate is valid at the chosen instant, and its ES384 "
    "signature; then, if asked, that its PCRs, nonce, user data and public key are the expected ones. A "
    "debug-mode enclave (PCR0, PCR1 and PCR2 all zero) is flagged, and fails when PCRs are expected. DOC is a "
    "file or '-' for stdin, raw CBOR, base64 or hex. The leaf certificate of a real document lives 3 hours: "
    "check a stored one with --at document.")


def add_parser(commands: Subparsers[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    group = command_group(commands, common, "attestation", "verify attestation documents")
    verify = command(group, common, "verify", help="verify an attestation document", description=DESCRIPTION,
                     codes=VERIFY_CODES, run=run_verify)
    verify.add_argument("document", metavar="DOC", help="the document: a file, or '-' for stdin (CBOR, base64 or hex)")
    verify.add_argument("--root", action="append", metavar="PEM",
                        help="trust the root certificate(s) in this PEM file instead of AWS's (repeatable)")
    verify.add_argument("--at", default="now", metavar="now|document|TIME",
                        help="the instant every certificate must be valid at: now (default), document (its own "
                             "timestamp), or an ISO 8601 time such as 2024-08-07T06:38:09Z (UTC if no zone)")
    verify.add_argument("--expect", metavar="MEASUREMENTS",
                        help="the expected PCRs: a measurements.json, an EIF, a build directory or a release "
                             "image, as `enclaver trust` reads them")
    verify.add_argument("--pcr", action="append", default=[], metavar="N=HEX",
                        help="expect PCR N to be HEX (repeatable; adds to or overrides --expect)")
    verify.add_argument("--nonce", metavar="HEX", help="expect this nonce")
    verify.add_argument("--user-data", metavar="HEX", help="expect this user_data")
    verify.add_argument("--public-key", metavar="HEX", help="expect this public_key")
    add_json(verify)
    for hook in EXTRA_SUBCOMMANDS:
        hook(group, common)


def read_document(source: str) -> bytes:
    """The document's CBOR bytes from a file or stdin: binary as is, text as base64 (or hex)."""
    try:
        if source == "-":
            raw = sys.stdin.buffer.read(MAX_INPUT + 1)
        else:
            with open(source, "rb") as f:
                raw = f.read(MAX_INPUT + 1)
    except OSError as e:
        raise InvalidInput(f"cannot read it: {e.strerror or e}", file=source,
                           fix="give the document's path, or '-' to read stdin") from None
    if len(raw) > MAX_INPUT:
        raise InvalidInput(f"larger than {MAX_INPUT // 1024} KiB: not an attestation document", file=source)
    if not raw or raw[0] in (0x84, 0xD2) or not _TEXT.fullmatch(raw):
        return raw  # binary: CBOR (a COSE_Sign1 starts 84, or d2 for tag 18)
    text = b"".join(raw.split())
    if _HEX.fullmatch(text):
        return bytes.fromhex(text.decode())
    try:
        padded = text + b"=" * (-len(text) % 4)
        return base64.b64decode(padded.replace(b"-", b"+").replace(b"_", b"/"), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput("neither CBOR nor base64 nor hex", file=source,
                           fix="pass the document the NSM returned, as raw bytes, base64 or hex") from None


def _at(value: str, out: Output) -> datetime | str:
    from datetime import UTC, datetime

    if value in ("now", "document"):
        return datetime.now(UTC) if value == "now" else value
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidInput(f"{value!r} is not now, document or an ISO 8601 time", field="--at",
                           fix="e.g. --at 2024-08-07T06:38:09Z") from None
    if moment.utcoffset() is None:
        out.note(f"--at {value}: no time zone given, taken as UTC")
        moment = moment.replace(tzinfo=UTC)
    return moment


def _hex_flag(value: str | None, flag: str) -> bytes | None:
    if value is None:
        return None
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise InvalidInput(f"{value!r} is not hexadecimal", field=flag, fix="give the bytes as hex digits") from None


def _read_small(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE + 1)
    except OSError as e:
        raise InvalidInput(f"cannot read {what}: {e.strerror or e}", file=path) from None
    if len(data) > MAX_FILE:
        raise InvalidInput(f"larger than {MAX_FILE >> 20} MiB: not {what}", file=path)
    return data


def _roots(paths: list[str] | None) -> list[x509.Certificate]:
    from enclaver_rules.attestation import roots

    if not paths:
        return [roots.aws_root()]
    return [cert for path in paths for cert in roots.load_roots(_read_small(path, "a PEM file"), path)]


def expected_pcrs(expect: str | None, flags: list[str]) -> dict[int, bytes] | None:
    """--expect's PCRs, then each --pcr N=HEX over them; None when neither is given."""
    from enclaver_rules.attestation import pcrs

    if expect is None and not flags:
        return None
    found: dict[int, bytes] = {}
    if expect is not None:
        found = pcrs.parse_measurements(_measurements(expect), expect)
    for flag in flags:
        index, sep, value = flag.partition("=")
        index = index.strip().upper().removeprefix("PCR")
        if not sep or not index.isdecimal() or len(index) > 2 or not 0 <= int(index) < pcrs.COUNT:
            raise InvalidInput(f"{flag!r} is not N=HEX with N in 0..31", field="--pcr", fix="e.g. --pcr 0=5fec1b…")
        found[int(index)] = pcrs.parse_hex(value.strip(), "--pcr", f"--pcr {index}")
    return found


def _measurements(source: str) -> Any:
    """A measurements.json as is; an EIF, a build directory or a release image through `enclaver trust`."""
    from enclaver_rules.cli.trust import is_eif, measurements_of

    path = Path(source)
    if path.is_file() and not is_eif(path):
        try:
            data = json.loads(_read_small(source, "a measurements file"))
        except ValueError as e:
            raise InvalidInput(f"not JSON ({e})", file=source, fix="pass a measurements.json") from None
        return data  # its shape is parse_measurements' to check
    if not path.exists() and source.endswith(".json"):
        raise InvalidInput("no such file", file=source, field="--expect")
    try:
        found, _how = measurements_of(source, None)
    except EnclaverError as e:  # the expectation is unusable input (2), not a refused document (1)
        if isinstance(e, InvalidInput):
            raise
        raise InvalidInput(diagnostics=e.diagnostics) from None
    return {"Measurements": found}


def run_verify(args: argparse.Namespace, out: Output) -> int:
    from datetime import datetime

    from enclaver_rules.attestation.verify import verify

    at = _at(args.at, out)
    expect = expected_pcrs(args.expect, args.pcr)
    nonce, user_data, public_key = (_hex_flag(args.nonce, "--nonce"), _hex_flag(args.user_data, "--user-data"),
                                    _hex_flag(args.public_key, "--public-key"))
    trusted = _roots(args.root)
    data = read_document(args.document)
    report = verify(data, roots=trusted, at=at if isinstance(at, datetime) else "document", expect_pcrs=expect,
                    nonce=nonce, user_data=user_data, public_key=public_key)
    failure = report.failure
    code = ExitCode.OK if report.ok else ExitCode.INVALID_INPUT if failure and failure.code in UNREADABLE \
        else ExitCode.FAILURE
    if args.json:
        out.json({"source": args.document, "valid": report.ok, **report.to_json()})
        return code
    _print(report, args.document, args.at, out)
    return code


def _print(report: Report, source: str, at_flag: str, out: Output) -> None:
    from rich.text import Text

    from enclaver_rules.attestation.document import iso

    failure = report.failure
    if failure is None:
        out.line(Text(f"{source}: valid attestation document", style="green"))
    else:
        out.line(Text(f"{source}: INVALID: {failure.name}: {failure.detail}", style="red"))
    doc = report.document
    if doc is not None:
        out.line(f"  module_id  {doc.module_id}")
        out.line(f"  timestamp  {iso(doc.time)} ({doc.timestamp} ms)")
        out.line(f"  debug      {'yes: PCR0, PCR1 and PCR2 are zero (its measurements prove nothing)' if report.debug else 'no'}")
        if report.at is not None:
            how = "the document's timestamp" if at_flag == "document" else "now" if at_flag == "now" else "--at"
            out.line(f"  checked at {iso(report.at)} ({how})")
        zero = [str(i) for i, v in doc.pcrs.items() if not any(v)]
        for index, value in doc.pcrs.items():
            if any(value):
                out.line(f"  {'PCR' + str(index):<10} {value.hex()}")
        if zero:
            out.line(f"  zero PCRs  {', '.join(zero)}")
    for check in report.checks:
        mark = Text("  ok   " if check.ok else "  FAIL ", style="green" if check.ok else "red")
        out.line(mark + Text(f"{check.name:<11}{check.detail}"))
