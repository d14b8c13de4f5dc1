"""`enclaver attestation ca` and `enclaver attestation sim-nsm`: the simulator's CA, and its NSM on a socket.

Parsing flags and printing only; the CA and the NSM are `enclaver_rules.runtime.sim_nsm`. Importing
this module adds both sub-commands to the `attestation` group (`EXTRA_SUBCOMMANDS`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any

from enclaver_rules.cli import attestation as attestation_cmd
from enclaver_rules.cli.exit_codes import ExitCode
from enclaver_rules.cli.options import Subparsers, add_json, command
from enclaver_rules.errors import InvalidInput

if TYPE_CHECKING:
    from enclaver_rules.cli.output import Output
    from enclaver_rules.runtime.sim_nsm import CertificateAuthority, SimulatedNsm

MAX_MEASUREMENTS = 1 << 20

CA_CODES = {
    ExitCode.OK: "the CA exists (made now if it was missing) and was described",
    ExitCode.FAILURE: "the state directory could not be created, read or written, or holds a broken CA",
    ExitCode.INVALID_INPUT: "the state directory is unsafe: others may read its keys or write to it, or it is not "
                            "yours",
}
SIM_CODES = {
    ExitCode.OK: "served until SIGTERM or SIGINT (Ctrl-C), then stopped and removed the socket",
    ExitCode.FAILURE: "the CA could not be set up or the socket could not be opened",
    ExitCode.INVALID_INPUT: "a flag or the measurements file is wrong, the socket path is taken, or the state "
                            "directory is unsafe",
}
CA_DESCRIPTION = (
    "Make the simulator's certificate authority if it is missing, and say where it is: a root (30 years) and an "
    "intermediate, ECDSA P-384, kept in a state directory (--state, else $ENC_SIM_STATE, else "
    "$XDG_STATE_HOME/enclaver/sim-nsm, else ~/.local/state/enclaver/sim-nsm; keys 0600 in a 0700 directory). "
    "Its certificates are shaped like AWS's but say O=enclaver, OU=simulated: documents from the simulated NSM "
    "verify against this root and never against AWS's. Give the root to verifiers and to the local KMS with "
    "--print-root.")
SIM_DESCRIPTION = (
    "Serve a simulated Nitro Secure Module on a Unix socket (mode 0600), for odyn outside Nitro hardware (its "
    "NSM client's `unix:PATH`): the NSM API of /dev/nsm, framed as a 4-byte big-endian length and the same CBOR. The "
    "enclave boots with PCR0/1/2/8 from --measurements (zero with --debug-mode, as on hardware), PCR3 from "
    "--role-arn, PCR4 from --instance-id, PCRs 0..15 locked; documents are signed by a 3-hour leaf made for "
    "this boot under the CA of `enclaver attestation ca`, whose keys stay in this process. Runs until SIGTERM "
    "or SIGINT.")


def add_subcommands(group: Subparsers[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    p = command(group, common, "ca", help="make (if missing) and show the simulator's CA", codes=CA_CODES,
                run=run_ca, description=CA_DESCRIPTION)
    _state(p)
    p.add_argument("--print-root", action="store_true",
                   help="print the root certificate (PEM) on stdout, the description on stderr")
    add_json(p)

    p = command(group, common, "sim-nsm", help="serve a simulated NSM on a Unix socket", codes=SIM_CODES,
                run=run_sim_nsm, description=SIM_DESCRIPTION)
    p.add_argument("--socket", required=True, metavar="PATH", help="the Unix socket to listen on (created 0600)")
    p.add_argument("--measurements", required=True, metavar="FILE",
                   help="the enclave's measurements.json (PCR0, PCR1, PCR2, and PCR8 if signed), as the build "
                        "writes it")
    _state(p)
    p.add_argument("--debug-mode", action="store_true",
                   help="boot as a debug-mode enclave: PCR0, PCR1, PCR2 and PCR8 are zero")
    p.add_argument("--instance-id", metavar="i-…",
                   help="the parent instance, measured into PCR4 and named in module_id (default: one derived "
                        "from the CA, the same on every start)")
    p.add_argument("--role-arn", metavar="ARN", help="the parent's IAM role, measured into PCR3 (default: none, zero)")
    add_json(p)


def _state(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--state", metavar="DIR",
                        help="the CA's state directory (default: $ENC_SIM_STATE, else "
                             "$XDG_STATE_HOME/enclaver/sim-nsm, else ~/.local/state/enclaver/sim-nsm)")


def _open_ca(state: str | None) -> CertificateAuthority:
    from enclaver_rules.runtime.sim_nsm import CertificateAuthority

    return CertificateAuthority.open(Path(state) if state else None)


def _describe(ca: CertificateAuthority) -> dict[str, Any]:
    return {"state": str(ca.directory), "root": str(ca.root_path), "root_sha256": ca.fingerprint,
            "created": ca.created}


def run_ca(args: argparse.Namespace, out: Output) -> int:
    ca = _open_ca(args.state)
    facts = _describe(ca)
    if args.json:
        out.json(facts)
    elif args.print_root:
        out.stdout.write(ca.root_pem.decode())
    else:
        for key in ("state", "root", "root_sha256"):
            out.line(f"{key:<12} {facts[key]}")
    if args.print_root or args.json:
        out.note(f"{'made' if ca.created else 'using'} the simulator's CA in {ca.directory}; root SHA-256 "
                 f"{ca.fingerprint}")
    elif ca.created:
        out.note(f"made a new CA: verifiers trust it with `enclaver attestation verify --root {ca.root_path}`")
    return ExitCode.OK


def _measurements(path: str) -> dict[int, bytes]:
    from enclaver_rules.attestation.pcrs import parse_measurements

    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_MEASUREMENTS + 1)
    except OSError as e:
        raise InvalidInput(f"cannot read it: {e.strerror or e}", file=path, field="--measurements") from None
    if len(raw) > MAX_MEASUREMENTS:
        raise InvalidInput("larger than 1 MiB: not a measurements file", file=path, field="--measurements")
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise InvalidInput(f"not JSON ({e})", file=path, fix="pass the measurements.json the build wrote") from None
    return parse_measurements(data, path)


def run_sim_nsm(args: argparse.Namespace, out: Output) -> int:
    import asyncio

    from enclaver_rules.runtime.sim_nsm import SimulatedNsm

    measurements = _measurements(args.measurements)
    ca = _open_ca(args.state)
    nsm = SimulatedNsm(ca, measurements, instance_id=args.instance_id, role_arn=args.role_arn,
                       debug_mode=args.debug_mode)
    asyncio.run(_serve(nsm, args.socket, args.json, out))
    return ExitCode.OK


async def _serve(nsm: SimulatedNsm, path: str, as_json: bool, out: Output) -> None:
    import asyncio

    from enclaver_rules.runtime.sim_nsm import serve

    server = await serve(nsm, path)
    ours = os.lstat(path).st_ino  # removed at the end only if it is still our socket
    loop, stop = asyncio.get_running_loop(), asyncio.Event()
    signals = (signal.SIGTERM, signal.SIGINT)
    for number in signals:
        loop.add_signal_handler(number, stop.set)
    try:
        facts = {"socket": os.path.abspath(path), "module_id": nsm.module_id, "instance_id": nsm.instance_id,
                 "debug_mode": nsm.debug_mode, **_describe(nsm.ca)}
        if as_json:
            out.json(facts)
        else:
            for key in ("socket", "module_id", "root", "root_sha256"):
                out.line(f"{key:<12} {facts[key]}")
            if nsm.debug_mode:
                out.line(f"{'debug_mode':<12} yes: PCR0, PCR1, PCR2 and PCR8 are zero")
        out.stdout.flush()  # a script waits for these lines before it starts the enclave
        out.note(f"serving the simulated NSM at {path} until SIGTERM or Ctrl-C")
        await stop.wait()
    finally:
        for number in signals:
            loop.remove_signal_handler(number)
        server.close()
        await server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            info = os.lstat(path)
            if stat.S_ISSOCK(info.st_mode) and info.st_ino == ours:
                os.unlink(path)
    out.note("stopped")


if add_subcommands not in attestation_cmd.EXTRA_SUBCOMMANDS:
    attestation_cmd.EXTRA_SUBCOMMANDS.append(add_subcommands)
