"""`enclaver imds serve`: a local IMDSv2 serving an instance role's rotating credentials.

Parsing flags and printing only; the service is `enclaver_rules.kms.imds`.
"""

from __future__ import annotations

import argparse
import ipaddress
import signal
import threading
from datetime import timedelta
from typing import TYPE_CHECKING

from enclaver_rules import redact
from enclaver_rules.cli.exit_codes import ExitCode
from enclaver_rules.cli.options import Subparsers, add_json, command, command_group
from enclaver_rules.errors import InvalidInput, OperationFailed

if TYPE_CHECKING:
    from enclaver_rules.cli.output import Output

SERVE_CODES = {
    ExitCode.OK: "served until SIGTERM or SIGINT (Ctrl-C), then stopped",
    ExitCode.FAILURE: "the address could not be listened on (in use, not local, not permitted)",
    ExitCode.INVALID_INPUT: "a flag is wrong: --identity, --role, --lifetime, --region, --account or --instance-id",
}
DESCRIPTION = (
    "Serve an IMDSv2 (the EC2 instance metadata service) on HOST:PORT, for an enclave's KMS proxy and AWS SDKs "
    "off EC2: the token flow (PUT /latest/api/token with a TTL of 1 to 21600 seconds; GETs without a live token "
    "get 401, as on instances that require IMDSv2), the role name and its credentials at "
    "/latest/meta-data/iam/security-credentials/[ROLE] (the --identity key pair, a random session token, an "
    "Expiration --lifetime ahead), the instance identity document, placement/availability-zone, placement/region "
    "and instance-id. A new session token and Expiration are issued once half the lifetime has passed or less than "
    "5 minutes are left, whichever is first (every request for a lifetime of 5 minutes or less), so clients cross "
    "their refresh windows quickly with a short --lifetime. The local KMS (`enclaver kms serve`) accepts any "
    "session token for an access key id it knows. Port 0 picks a free port; the ready line says which. Runs until "
    "SIGTERM or SIGINT.")


def add_parser(commands: Subparsers[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    group = command_group(commands, common, "imds", "a local instance metadata service (IMDSv2)")
    p = command(group, common, "serve", help="serve IMDSv2 with an instance role's rotating credentials",
                codes=SERVE_CODES, run=run_serve, description=DESCRIPTION)
    p.add_argument("--port", required=True, type=int, metavar="N", help="the TCP port (0: any free one)")
    p.add_argument("--role", required=True, metavar="NAME", help="the instance role's name")
    p.add_argument("--identity", required=True, metavar="ACCESS_KEY_ID:SECRET_ACCESS_KEY",
                   help="the key pair the credentials carry (as the local KMS's --identity names it)")
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: 127.0.0.1)")
    p.add_argument("--lifetime", type=int, default=3600, metavar="SECONDS",
                   help="how long each set of credentials is valid, 1 to 43200 (default: 3600)")
    p.add_argument("--region", default="us-east-1", help="the instance's region (default: us-east-1)")
    p.add_argument("--account", default="111122223333", metavar="ACCOUNT_ID",
                   help="the account in the identity document (default: 111122223333)")
    p.add_argument("--instance-id", default="i-0123456789abcdef0", metavar="i-…",
                   help="the instance id (default: i-0123456789abcdef0)")
    add_json(p)


def run_serve(args: argparse.Namespace, out: Output) -> int:
    from enclaver_rules.kms import imds

    try:
        identity = imds.Identity.parse(args.identity)
    except ValueError as e:
        raise InvalidInput(str(e), field="--identity") from None  # the message never quotes the secret
    redact.remember(identity.secret_access_key)
    checks = [("--role", args.role, imds.ROLE, "an IAM role name: 1 to 64 of letters, digits and +=,.@_-"),
              ("--region", args.region, imds.REGION, "a region such as us-east-1"),
              ("--account", args.account, imds.ACCOUNT, "12 digits"),
              ("--instance-id", args.instance_id, imds.INSTANCE_ID, "i- and 8 or 17 hex digits")]
    for flag, value, pattern, want in checks:
        if not pattern.fullmatch(value):
            raise InvalidInput(f"{value!r} is not {want}", field=flag)
    if not 1 <= args.lifetime <= imds.MAX_LIFETIME:
        raise InvalidInput(f"{args.lifetime} is not 1 to {imds.MAX_LIFETIME} seconds", field="--lifetime")
    if not 0 <= args.port <= 65535:
        raise InvalidInput(f"{args.port} is not a TCP port", field="--port")
    service = imds.LocalImds(args.role, identity, lifetime=timedelta(seconds=args.lifetime),
                             instance=imds.Instance(args.region, args.account, args.instance_id))

    # SIGTERM and SIGINT are blocked before any thread starts (threads inherit the mask) and taken with
    # sigwait: the main thread wakes for them alone, then stops the server cleanly.
    stop_on = {signal.SIGTERM, signal.SIGINT}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, stop_on)
    try:
        try:
            server = imds.serve(service, args.host, args.port)
        except OSError as e:
            raise OperationFailed(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}", field="--port",
                                  fix="choose another port, or 0 for any free one") from None
        thread = threading.Thread(target=server.serve_forever, name="imds", daemon=True)
        thread.start()
        try:
            host, port = server.socket.getsockname()[:2]
            shown = f"[{host}]" if ":" in host else host
            facts = {"url": f"http://{shown}:{port}", "port": port, "role": args.role,
                     "access_key_id": identity.access_key_id, "lifetime": args.lifetime, "region": args.region}
            if args.json:
                out.json(facts)
            else:
                out.line(f"serving IMDSv2 at {facts['url']}: role {args.role}, access key id "
                         f"{identity.access_key_id}, credentials valid {args.lifetime} s, region {args.region}")
            out.stdout.flush()  # a script waits for this line
            if not _loopback(host):
                out.note(f"warning: {host} is not a loopback address: anything that reaches it gets these "
                         "credentials", style="yellow")
            out.note("serving until SIGTERM or Ctrl-C")
            signal.sigwait(stop_on)
        finally:
            server.shutdown()
            server.server_close()
            thread.join()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    out.note("stopped")
    return ExitCode.OK


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
