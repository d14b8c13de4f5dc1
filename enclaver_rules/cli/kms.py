"""`enclaver kms serve`: a local KMS that enforces key policies and answers `Recipient` as KMS does.

Parsing flags and printing only; the server is `enclaver_rules.kms.server`, the actions
`enclaver_rules.kms.actions`, the keys `enclaver_rules.kms.keystore`.
"""

from __future__ import annotations

import argparse
import re
import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from enclaver_rules.cli.exit_codes import ExitCode
from enclaver_rules.cli.options import Subparsers, command, command_group
from enclaver_rules.errors import InvalidInput, OperationFailed

if TYPE_CHECKING:
    from cryptography import x509

    from enclaver_rules.cli.output import Output
    from enclaver_rules.kms.sigv4 import Identity

MAX_ROOTS_FILE = 1 << 20
_ACCESS_KEY = re.compile(r"\w{3,128}")
_PRINCIPAL = re.compile(r"arn:aws[a-z-]*:(iam|sts)::\d{12}:(root|user/[\w+=,.@/-]+|role/[\w+=,.@/-]+|"
                        r"assumed-role/[\w+=,.@-]+/[\w+=,.@-]+)")
_ACCOUNT = re.compile(r"\d{12}")
_REGION = re.compile(r"[a-z]{2}(-[a-z0-9]+)+")

SERVE_CODES = {
    ExitCode.OK: "served until SIGTERM or SIGINT (Ctrl-C), then stopped",
    ExitCode.FAILURE: "the port could not be opened, or the state directory is in use by another local KMS or holds "
                      "a broken key file",
    ExitCode.INVALID_INPUT: "a flag is wrong (an --identity, --attestation-root, --account or --region), or the state "
                            "directory is unsafe (open to others, not yours)",
}
DESCRIPTION = (
    "Serve a local AWS KMS on http://HOST:PORT for tests: any AWS SDK or CLI pointed at it with --endpoint-url "
    "(AWS JSON 1.1, SigV4 checked against the --identity secrets). It enforces key policies (explicit Deny wins, "
    "then an Allow or a grant; conditions on kms:RecipientAttestation:ImageSha384, kms:RecipientAttestation:PCR0..31, "
    "aws:PrincipalArn and kms:CallerAccount; any other condition key or operator is refused when the policy is put, "
    "never ignored; the lock-out safety check), and answers a Recipient (Decrypt, GenerateDataKey, "
    "GenerateDataKeyPair, GenerateRandom, DeriveSharedSecret) as KMS does: the attestation document is verified "
    "against the --attestation-root files and AWS's root, its PCRs become the condition keys, and the secret comes "
    "back only as CiphertextForRecipient, sealed for the document's RSA key. IAM is not modelled: a policy's "
    "account root admits every principal of that account, and CreateKey, ListKeys and GenerateRandom are open to "
    "every identity. Keys, policies and grants persist in --state (0700, key files 0600). Prints one line "
    "starting `ready` on stdout when the port accepts connections; runs until SIGTERM or SIGINT.")


def add_parser(commands: Subparsers[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    group = command_group(commands, common, "kms", "a local KMS that enforces key policies and attestation")
    p = command(group, common, "serve", help="serve a local KMS that enforces key policies and attestation",
                description=DESCRIPTION, codes=SERVE_CODES, run=run_serve)
    p.add_argument("--state", required=True, metavar="DIR",
                   help="where keys, policies and grants are kept (made 0700; one server per directory)")
    p.add_argument("--port", required=True, type=int, metavar="N", help="the TCP port (0: any free port)")
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: 127.0.0.1)")
    p.add_argument("--region", default="us-east-1", help="the region requests are signed for (default: us-east-1)")
    p.add_argument("--account", default="111122223333",
                   help="the account that owns the keys (in their ARNs; default: 111122223333)")
    p.add_argument("--identity", action="append", default=[], metavar="ACCESS_KEY_ID:SECRET_ACCESS_KEY=PRINCIPAL_ARN",
                   help="a caller: requests signed with this key act as PRINCIPAL_ARN (repeat for more); a request "
                        "with a session token is accepted for a known key whatever the token")
    p.add_argument("--attestation-root", action="append", default=[], metavar="PEM_FILE",
                   help="trust attestation documents that chain to the root(s) in this PEM file, e.g. the simulated "
                        "NSM's (`enclaver attestation ca`); repeat for more")
    p.add_argument("--no-aws-root", action="store_true",
                   help="do not trust AWS's Nitro Enclaves root (only the --attestation-root files)")


def parse_identity(value: str) -> Identity:
    from enclaver_rules.kms.sigv4 import Identity

    access_key, _, rest = value.partition(":")
    secret, _, principal = rest.partition("=")
    fix = ("give the access key id, a colon, the secret access key, an equals sign, then the principal's ARN "
           "(arn:aws:iam::111122223333:role/Admin)")
    if not _ACCESS_KEY.fullmatch(access_key):
        raise InvalidInput(f"the access key id {access_key[:40]!r} is not 3..128 letters, digits or _",
                           field="--identity", fix=fix)
    if not secret:
        raise InvalidInput(f"identity {access_key} has no secret access key", field="--identity", fix=fix)
    if not _PRINCIPAL.fullmatch(principal):
        raise InvalidInput(f"identity {access_key}: {principal[:80]!r} is not an IAM user, role, account root or "
                           f"assumed-role ARN", field="--identity", fix=fix)
    return Identity(access_key, secret, principal)


def _roots(files: list[str], aws: bool) -> list[tuple[x509.Certificate, str]]:
    from enclaver_rules.attestation.roots import aws_root, load_roots

    out = []
    for name in files:
        try:
            with open(name, "rb") as f:
                pem = f.read(MAX_ROOTS_FILE + 1)
        except OSError as e:
            raise InvalidInput(f"cannot read it: {e.strerror or e}", file=name, field="--attestation-root") from None
        out += [(cert, name) for cert in load_roots(pem, name)]
    if aws:
        out.append((aws_root(), "AWS Nitro Enclaves Root-G1"))
    return out


def run_serve(args: argparse.Namespace, out: Output) -> int:
    from enclaver_rules.attestation.roots import fingerprint
    from enclaver_rules.kms.actions import LocalKms
    from enclaver_rules.kms.keystore import KeyStore
    from enclaver_rules.kms.server import serve

    if not _ACCOUNT.fullmatch(args.account):
        raise InvalidInput(f"{args.account!r} is not a 12-digit AWS account ID", field="--account")
    if not _REGION.fullmatch(args.region):
        raise InvalidInput(f"{args.region!r} is not a region name", field="--region", fix="e.g. us-east-1")
    if not 0 <= args.port <= 65535:
        raise InvalidInput(f"{args.port} is not a TCP port", field="--port", fix="0..65535 (0: any free port)")
    identities = {}
    for value in args.identity:
        identity = parse_identity(value)
        if identity.access_key in identities:
            raise InvalidInput(f"access key {identity.access_key} is given twice", field="--identity")
        identities[identity.access_key] = identity
    roots = _roots(args.attestation_root, not args.no_aws_root)
    if not identities:
        out.note("warning: no --identity: every request will be refused (UnrecognizedClientException)")
    if not roots:
        out.note("warning: no trusted attestation root: every Recipient will be refused")

    with KeyStore.open(Path(args.state)) as store:
        kms = LocalKms(store, region=args.region, account=args.account, roots=[cert for cert, _ in roots])
        try:
            server = serve(kms, identities, args.host, args.port)
        except OSError as e:
            raise OperationFailed(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}",
                                  field="--port") from None
        host, port = str(server.server_address[0]), int(server.server_address[1])
        endpoint = f"http://{f'[{host}]' if ':' in host else host}:{port}"
        # SIGTERM and SIGINT are blocked in every thread (the server's threads inherit the mask) and
        # taken here with sigwait: a handler would run only when the signal lands on the main thread
        signals = {signal.SIGTERM, signal.SIGINT}
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
        worker = threading.Thread(target=server.serve_forever, name="kms-http", daemon=True)
        try:
            worker.start()
            out.stdout.write(f"ready {endpoint} region={args.region} account={args.account} "
                             f"identities={','.join(identities) or '-'} "
                             f"roots={','.join('sha256:' + fingerprint(c) for c, _ in roots) or '-'} "
                             f"state={store.directory}\n")
            out.stdout.flush()  # a script waits for this line
            for identity in identities.values():
                out.note(f"identity {identity.access_key} acts as {identity.principal}")
            for cert, source in roots:
                out.note(f"trusting attestation root {fingerprint(cert)} ({source})")
            out.note(f"local KMS for {args.account} in {args.region} at {endpoint}, {len(store.all())} key(s) in "
                     f"{store.directory}; until SIGTERM or Ctrl-C")
            signal.sigwait(signals)
        finally:
            if worker.is_alive():
                server.shutdown()  # blocks until serve_forever returns: only when it runs
            server.server_close()
            worker.join(10)
            while signal.sigtimedwait(signals, 0) is not None:  # a second signal: consumed, not re-raised
                pass
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    out.note("stopped")
    return ExitCode.OK
