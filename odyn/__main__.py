"""`odyn [options] -- APP ARGV...`: run APP under the supervisor (see odyn.supervisor)."""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import sys

from enclaver_rules.kms.credentials import ImdsCredentials
from enclaver_rules.link.transport import Transport, UnixTransport, VsockTransport
from odyn import bringup, nsm, sandbox
from odyn.console import Console
from odyn.logring import DEFAULT_SIZE
from odyn.supervisor import DEFAULT_FLUSH, DEFAULT_IMDS, DEFAULT_LINGER, EXIT_FATAL, Supervisor, no_bring_up


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="odyn", description="enclaver's in-enclave supervisor",
                                     epilog="exit codes: the app's; 107 app killed by a signal; 108 odyn failed; "
                                            "2 bad arguments")
    parser.add_argument("--config-dir", default="/etc/enclaver", help="holds enclaver.yaml (upstream's flag)")
    parser.add_argument("--transport", default="vsock", metavar="vsock|unix:DIR",
                        help="vsock (in an enclave) or unix:DIR (the simulator and tests)")
    parser.add_argument("--cid", type=int, default=16, help="this side's CID for unix:DIR transports")
    parser.add_argument("--log-ring-bytes", type=int, default=DEFAULT_SIZE)
    parser.add_argument("--linger", type=float, default=DEFAULT_LINGER,
                        help="seconds readers get for the final status and the end of the log")
    parser.add_argument("--flush-timeout", type=float, default=DEFAULT_FLUSH,
                        help="seconds open ingress/egress connections get to deliver data after the app exits")
    parser.add_argument("--no-bootstrap", action="store_true",
                        help="skip bring-up (mounts, loopback, hostname, NSM entropy), as upstream's flag")
    parser.add_argument("--no-console", action="store_true",
                        help="do not copy the log (the app's output, odyn's lines) to odyn's stdout; the log "
                             "stream on vsock 17001 is unaffected")
    parser.add_argument("--nsm", default="auto", metavar="auto|none|device[:PATH]|unix:PATH",
                        help="the NSM the attestation API asks (when the manifest has api:): auto (/dev/nsm when "
                             "present), the device, or a simulated NSM on a Unix socket")
    parser.add_argument("--imds", metavar="URL", default=os.environ.get("AWS_EC2_METADATA_SERVICE_ENDPOINT") or DEFAULT_IMDS,
                        help="the instance metadata service the KMS proxy gets credentials from, through egress "
                             f"(default: $AWS_EC2_METADATA_SERVICE_ENDPOINT, else {DEFAULT_IMDS}; "
                             "a local one: `enclaver imds serve`)")
    parser.add_argument("app", nargs=argparse.REMAINDER, help="-- then the app's argv")
    args = parser.parse_args(argv)
    if args.app[:1] == ["--"]:
        args.app = args.app[1:]
    if not args.app:
        parser.error("give the app after --")
    try:
        ImdsCredentials(args.imds)  # checks the URL; fetches nothing
    except ValueError as e:
        parser.error(f"--imds: {e}")
    if not nsm.valid_spec(args.nsm):
        parser.error(f"--nsm {args.nsm!r}: use auto, none, device, device:PATH or unix:PATH")
    return args


def transport(spec: str, cid: int) -> Transport:
    if spec == "vsock":
        return VsockTransport()
    if spec.startswith("unix:"):
        return UnixTransport(spec[len("unix:"):], cid)
    raise SystemExit(f"odyn: unknown transport {spec!r}; use vsock or unix:DIR")


PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> None:
    """Outside PID 1 (simulator, tests), adopt orphaned descendants as PID 1 would, so the same
    reaping code runs everywhere. Best effort: a libc-less binary may have no ctypes."""
    if os.getpid() == 1:
        return
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError, ImportError):
        pass


def bring_up() -> list[str]:
    source = (lambda: nsm.get_random(nsm.NsmDevice())) if os.path.exists(nsm.DEVICE) else None
    return bringup.bring_up(source)


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    become_subreaper()
    path = os.path.join(args.config_dir, "enclaver.yaml")
    try:
        sandbox.native_abi()  # fail now, loudly, on an architecture the no-bypass filter does not know
        sandbox.protect_supervisor()
        supervisor = Supervisor(transport(args.transport, args.cid), args.log_ring_bytes, args.linger,
                                flush=args.flush_timeout, confine=sandbox.confine_app,
                                bring_up=no_bring_up if args.no_bootstrap else bring_up,
                                set_hostname=not args.no_bootstrap, nsm=functools.partial(nsm.open_nsm, args.nsm),
                                imds=args.imds, console=None if args.no_console else Console())
        return asyncio.run(supervisor.run(args.app, dict(os.environ), path if os.path.exists(path) else None))
    except OSError as e:
        print(f"odyn: {e}", file=sys.stderr)
        return EXIT_FATAL


if __name__ == "__main__":
    sys.exit(main())
