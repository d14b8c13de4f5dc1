"""`enclaver run IMAGE|EIF`: start an enclave (nitro-cli on a Nitro host, `--simulate` elsewhere) and run its
host side. Parsing flags and printing only; the work is `enclaver_rules.runtime` (run, simulator, runnable,
nitro_cli, allocator, systemd)."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from enclaver_rules.cli.exit_codes import ExitCode
from enclaver_rules.cli.options import Subparsers, command
from enclaver_rules.errors import InvalidInput

if TYPE_CHECKING:  # not at run time: the runtime image's binary (runtime/main.py) has no rich
    from enclaver_rules.cli.output import Output

NITRO_DEVICE = "/dev/nitro_enclaves"
CODES: dict[int, str] = {
    ExitCode.OK: "the app exited 0; any other exit code of the app (1–255) comes through as it is",
    ExitCode.FAILURE: "also: the enclave could not be started (nitro-cli's error and log are shown), the engine "
                      "failed, a measurement did not match --verify-before-run, or the enclave ended without a "
                      "final status",
    ExitCode.INVALID_INPUT: "also: a flag is wrong, the image was not built by enclaver, -p names a port the "
                            "manifest does not list, or there is no /dev/nitro_enclaves (use --simulate)",
    107: "the app was killed by a signal",
    108: "odyn failed (bad manifest, the app could not start, no NSM for the attestation API, …)",
    109: "interrupted: SIGTERM or SIGINT stopped the enclave (after the final status and the logs were drained)",
}
DESCRIPTION = (
    "Run an enclave built by enclaver: a release image in the store (`enclaver image pull` brings one from a "
    "registry), an EIF, or a build's output directory (cache/out/NAME/latest). Images without enclaver's "
    "labels are refused. With --verify-before-run the PCRs recomputed from the EIF must equal the file's before "
    "anything starts. On a Nitro host nitro-cli starts the EIF (allocator advice first; --configure-allocator "
    "writes the allocator file; the transient E29 is retried; the CID is printed); --simulate runs the enclave "
    "image the EIF was made from in Docker with no network, the simulated NSM (PCRs of the EIF; its CA's keys "
    "stay on the host) and Unix sockets for vsock. Either way the host side runs here: the app's output on "
    "stdout, its status on stderr, -p ingress listeners, the egress connector (which checks the manifest's "
    "policy again), sd_notify READY when the app runs and STOPPING at the end. SIGTERM/SIGINT stop the enclave "
    "and drain its final status and logs. The exit code is the app's.")
_SIM_HOST = re.compile(r"^(?P<name>[^=\s]+)=(?P<ip>\[[0-9A-Fa-f:.]+\]|[0-9.]+):(?P<port>\d{1,5})$")


def add_parser(commands: Subparsers[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    p = command(commands, common, "run", help="run an enclave (nitro-cli, or --simulate in Docker) and its host side",
                codes=CODES, run=run_cmd, description=DESCRIPTION)  # type: ignore[arg-type]  # 107–109 are run's own
    add_arguments(p)


def add_arguments(p: argparse.ArgumentParser, *, runtime: bool = False) -> None:
    """`enclaver run`'s flags; `runtime`: the runtime image's `enclaver-run` (runtime/main.py), which runs
    its release image's /enclave by default, publishes every ingress port unless -p says otherwise, and
    has no simulator (no Docker in there) and no store."""
    if runtime:
        p.add_argument("image", metavar="EIF|DIR", nargs="?", default="/enclave",
                       help="the EIF, or the directory holding application.eif (default: /enclave, the release "
                            "image's)")
    else:
        p.add_argument("image", metavar="IMAGE|EIF", help="a release image in the store, an EIF, or a build directory")
        p.add_argument("--simulate", action="store_true",
                       help="run the enclave image in Docker (no network; simulated NSM) instead of nitro-cli")
    p.add_argument("--cpu-count", type=int, metavar="N", help="CPUs (default: the manifest's defaults.cpu_count)")
    p.add_argument("--memory-mb", type=int, metavar="N", help="memory in MiB (default: defaults.memory_mb)")
    p.add_argument("-p", "--publish", action="append", default=[], metavar="[IP:]HOST_PORT:PORT",
                   help="listen on HOST_PORT (on IP, default 0.0.0.0) for the enclave's ingress PORT; repeat")
    p.add_argument("--verify-before-run", metavar="MEASUREMENTS.json",
                   help="fail before anything starts unless the EIF's PCRs equal this file's")
    p.add_argument("--debug-mode", action="store_true",
                   help="a debug-mode enclave: console available, attestation PCRs all zero")
    p.add_argument("--log-prefix", action="store_true", help="prefix each line of the enclave's output with `NAME| `")
    p.add_argument("--outputs-dir", metavar="DIR",
                   help="mirror the directories the manifest's outputs: lists under DIR (created if missing); "
                        "without it they stay in the enclave")
    p.add_argument("--configure-allocator", action="store_true",
                   help="Nitro: raise the allocator's reservation when the enclave does not fit (never silently)")
    if runtime:
        p.set_defaults(simulate=False, sim_host=[], sim_state=None, sim_kms=None, sim_imds=False, imds=None,
                       cache_dir=None, runtime=True)
        return
    p.add_argument("--sim-host", action="append", default=[], metavar="NAME=IP:PORT",
                   help="--simulate: egress to NAME (still subject to the policy) goes to IP:PORT; repeat")
    p.add_argument("--sim-state", metavar="DIR",
                   help="--simulate: the simulator's CA (default: as `enclaver attestation ca`)")
    p.add_argument("--sim-kms", metavar="STATE_DIR",
                   help="--simulate: start a local KMS (`enclaver kms serve --state STATE_DIR`, trusting the "
                        "simulator CA's root) and a local IMDS for the KMS proxy; the manifest's "
                        "kms_proxy.endpoints must name an http:// endpoint, whose host is mapped to it; the "
                        "admin credentials are written to STATE_DIR/credentials (0600)")
    p.add_argument("--sim-imds", action="store_true",
                   help="--simulate: start a local IMDS (role enclaver-sim-parent, random keys) and map "
                        "169.254.169.254 to it (implied by --sim-kms)")
    p.add_argument("--imds", metavar="URL", help="odyn's --imds for the KMS proxy (e.g. `enclaver imds serve`'s)")
    p.add_argument("--cache-dir", metavar="DIR", help="the store (default: $ENC_CACHE_DIR, else the repository's)")


def parse_sim_hosts(values: list[str]) -> dict[str, tuple[str, int]]:
    from enclaver_rules.policy import PolicyError, parse_destination

    out: dict[str, tuple[str, int]] = {}
    for value in values:
        match = _SIM_HOST.match(value)
        if match is None or not 0 < int(match["port"]) < 65536:
            raise InvalidInput(f"--sim-host {value!r}: not NAME=IP:PORT", field="--sim-host",
                               fix="for example --sim-host s3.us-east-1.amazonaws.com=127.0.0.1:9000")
        try:
            name = parse_destination(f"{match['name']}:1").host
        except PolicyError as e:
            raise InvalidInput(f"--sim-host {value!r}: {e.message}", field="--sim-host") from None
        out[name] = (match["ip"].strip("[]"), int(match["port"]))
    return out


def debug_mode_warning(manifest: Any, measurements: dict[str, str]) -> str:
    """Said before a --debug-mode enclave starts: its attestation is not this build's, so whatever
    pins the build's PCRs — a key policy from `enclaver trust --kms-policy` first — will refuse it."""
    kms = (" a KMS key policy that pins its PCRs (as `enclaver trust --kms-policy` writes) refuses its KMS proxy's "
           "requests, and") if manifest.kms_proxy is not None else ""
    return (f"warning: --debug-mode: the enclave's attestation documents carry all-zero PCR0, PCR1, PCR2 and PCR8, "
            f"not this build's (PCR0 {measurements.get('PCR0', '?')[:16]}…):{kms} any verifier expecting its "
            "measurements refuses it; debug mode is for the console, never for secrets")


def _stdout_writer(out: Output) -> Any:
    stream = out.stdout
    buffer = getattr(stream, "buffer", None)

    def write(data: bytes) -> None:
        if buffer is not None:
            stream.flush()
            buffer.write(data)
            buffer.flush()
        else:
            stream.write(data.decode("utf-8", "replace"))
            stream.flush()
    return write


def _status_note(out: Output) -> Any:
    def note(status: Any) -> None:
        detail = {"exited": f" code {status.code}", "signaled": f" signal {status.signal}",
                  "fatal": f": {status.error}"}.get(status.state, "")
        out.note(f"enclave: {status.state}{detail}")
    return note


def run_cmd(args: argparse.Namespace, out: Output) -> int:
    import tempfile

    from enclaver_rules.attestation.pcrs import parse_measurements
    from enclaver_rules.oci.store import Store, default_cache_dir
    from enclaver_rules.runtime.run import LinePrefixer, Publish, check_publish
    from enclaver_rules.runtime.runnable import resolve, verify_measurements
    from enclaver_rules.runtime.systemd import Notifier

    publish = tuple(Publish.parse(p) for p in args.publish)
    sim_hosts = parse_sim_hosts(args.sim_host)
    if (args.sim_kms or args.sim_imds) and not args.simulate:
        raise InvalidInput("--sim-kms and --sim-imds are for --simulate only", field="--sim-kms",
                           fix="on a Nitro host the KMS proxy uses AWS KMS and the instance's IMDS")
    if (args.sim_kms or args.sim_imds) and args.imds:
        raise InvalidInput("--imds and --sim-kms/--sim-imds both say where IMDS is", field="--imds",
                           fix="drop --imds (the simulator passes odyn --imds http://169.254.169.254, mapped to "
                               "its local IMDS)")
    if sim_hosts and not args.simulate:
        raise InvalidInput("--sim-host is for --simulate only", field="--sim-host",
                           fix="on a Nitro host names resolve through the parent's DNS")
    for flag in ("cpu_count", "memory_mb"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise InvalidInput(f"--{flag.replace('_', '-')} {value}: must be 1 or more", field=f"--{flag}")
    if not args.simulate and not os.path.exists(NITRO_DEVICE):
        raise InvalidInput(f"no {NITRO_DEVICE}: this is not a Nitro Enclaves host (or its driver is not loaded)",
                           fix="run the container with --device /dev/nitro_enclaves on a Nitro host; elsewhere, "
                               "`enclaver run --simulate IMAGE`" if getattr(args, "runtime", False) else
                               "add --simulate to run the enclave image in Docker with the simulated NSM")
    runtime = getattr(args, "runtime", False)  # the runtime image's enclaver-run: no store, publish all
    store = None if runtime else Store(Path(args.cache_dir) if args.cache_dir else default_cache_dir())
    with tempfile.TemporaryDirectory(prefix="enclaver-run-") as tmp:
        runnable = resolve(args.image, store, Path(tmp))
        if args.verify_before_run:
            try:
                expected = parse_measurements(json.loads(Path(args.verify_before_run).read_text()),
                                              args.verify_before_run)
            except (OSError, ValueError) as e:
                raise InvalidInput(f"cannot read it: {e}", file=args.verify_before_run,
                                   field="--verify-before-run") from None
            verify_measurements(runnable, expected, args.verify_before_run)
            out.note(f"measurements match {args.verify_before_run}: "
                     + ", ".join(f"PCR{i}" for i in sorted(expected)))
        manifest = runnable.manifest
        if args.debug_mode:
            out.note(debug_mode_warning(manifest, runnable.measurements), style="yellow")
        if runtime and not publish:  # as upstream's enclaver-run: every ingress port, on the same port
            publish = tuple(Publish(i.listen_port, i.listen_port) for i in manifest.ingress)
            if publish:
                out.note("publishing ingress " + ", ".join(str(p) for p in publish))
        check_publish(manifest, publish)
        for name, (ip, port) in sim_hosts.items():
            from enclaver_rules.policy import parse_destination

            if not manifest.egress.policy().decide(parse_destination(f"{name}:{port}")).allowed:
                raise InvalidInput(f"--sim-host {name}: the manifest's egress policy does not allow {name}",
                                   field="--sim-host", fix="allow it under egress.allow, or drop the mapping")
            out.note(f"sim-host: {name} → {ip}:{port}")
        published = {p.port for p in publish}
        unpublished = [i.listen_port for i in manifest.ingress if i.listen_port not in published]
        if unpublished:
            out.note(f"ingress {', '.join(map(str, unpublished))} not published (-p HOST_PORT:PORT to publish)")
        sink = _stdout_writer(out)
        prefixer = LinePrefixer(f"{manifest.name}| ".encode(), sink) if args.log_prefix else None
        if manifest.outputs and not args.outputs_dir:
            out.note(f"outputs {', '.join(manifest.outputs)} not collected (--outputs-dir DIR to mirror them)")
        side_options: dict[str, Any] = {
            "publish": publish, "on_log": prefixer or sink, "on_status": _status_note(out),
            "notifier": Notifier.from_env(unset=True), "outputs_dir": args.outputs_dir}
        memory = args.memory_mb or manifest.defaults.memory_mb
        cpus = args.cpu_count or manifest.defaults.cpu_count
        try:
            if args.simulate:
                code = _simulate(args, out, runnable, store, side_options, memory, cpus, sim_hosts)
            else:
                code = _nitro(args, out, runnable, side_options, memory, cpus)
        finally:
            if prefixer is not None:
                prefixer.flush()
    out.note(f"exit code {code}")
    return code


def _simulate(args: argparse.Namespace, out: Output, runnable: Any, store: Any, side_options: dict[str, Any],
              memory: int, cpus: int, sim_hosts: dict[str, tuple[str, int]]) -> int:
    import asyncio

    from enclaver_rules.oci.engine import Engine
    from enclaver_rules.runtime.simulator import SimOptions, simulate

    ca_state = Path(args.sim_state) if args.sim_state else None
    services = _start_sim_services(args, out, runnable.manifest, ca_state) if args.sim_kms or args.sim_imds else None
    try:
        hosts = {**sim_hosts, **(services.static_hosts if services else {})}
        options = SimOptions(memory, cpus, args.debug_mode, hosts, services.imds if services else args.imds, ca_state)
        out.note(f"simulating {runnable.manifest.name} ({runnable.source}): PCR0 "
                 f"{runnable.measurements['PCR0'][:16]}…{' (debug mode: PCRs zero)' if args.debug_mode else ''}, "
                 f"{cpus} CPUs, {memory} MiB, no network")
        sys.stdout.flush()
        return asyncio.run(simulate(runnable, store, Engine(), options, side_options))
    finally:
        if services is not None:
            services.stop()


def check_sim_service_egress(manifest: Any, static_hosts: dict[str, tuple[str, int]],
                             ports: dict[str, int]) -> None:
    """InvalidInput unless egress allows each mapped destination at the port odyn will ask for."""
    from enclaver_rules.policy import parse_destination

    if not manifest.egress.enabled:
        raise InvalidInput("--sim-kms/--sim-imds: the manifest's egress is off, so the KMS proxy reaches neither",
                           field="egress", fix="enable egress and allow the KMS endpoint's host and 169.254.169.254")
    for name in static_hosts:
        port = ports[name]
        if not manifest.egress.policy().decide(parse_destination(f"{name}:{port}")).allowed:
            raise InvalidInput(f"--sim-kms/--sim-imds: the manifest's egress policy does not allow {name}:{port}",
                               field="egress.allow", fix=f"add {name!r} to egress.allow")


def _start_sim_services(args: argparse.Namespace, out: Output, manifest: Any, ca_state: Path | None) -> Any:
    import tempfile

    from enclaver_rules.runtime.sim_nsm import CertificateAuthority
    from enclaver_rules.runtime.simulator import IMDS_ADDRESS, sim_kms_target, start_sim_services

    kms_state = Path(args.sim_kms) if args.sim_kms else None
    ports = {IMDS_ADDRESS: 80}
    if kms_state is not None:
        target = sim_kms_target(manifest)
        ports[target.host] = target.port
    check_sim_service_egress(manifest, dict.fromkeys(ports, ("", 0)), ports)
    ca_root = CertificateAuthority.open(ca_state).root_path if kms_state is not None else None
    log_dir = kms_state if kms_state is not None else Path(tempfile.mkdtemp(prefix="enclaver-sim-imds-"))
    services = start_sim_services(kms_state=kms_state, imds=True, ca_root=ca_root, manifest=manifest,
                                  log_dir=log_dir)
    for line in services.notes():
        out.note(line)
    return services


class NitroEnclave:
    """An enclave nitro-cli started: stop terminates it (nitro-cli has no gentler stop); gone asks
    describe-enclaves."""

    def __init__(self, cli: Any, started: Any) -> None:
        self.cli, self.started, self.cid, self.terminated = cli, started, started.cid, False

    def stop(self) -> None:
        if not self.terminated:
            self.cli.terminate_enclave(self.started.enclave_id)
            self.terminated = True

    def gone(self) -> bool:
        return self.terminated or all(e.enclave_id != self.started.enclave_id for e in self.cli.describe_enclaves())


def _nitro(args: argparse.Namespace, out: Output, runnable: Any, side_options: dict[str, Any],
           memory: int, cpus: int) -> int:
    import asyncio

    from enclaver_rules.link.transport import VsockTransport
    from enclaver_rules.runtime import allocator
    from enclaver_rules.runtime.egress_host import HostEgress
    from enclaver_rules.runtime.nitro_cli import NitroCli, RunEnclaveArgs
    from enclaver_rules.runtime.run import HostSide, run

    need = allocator.needs(runnable.manifest, runnable.eif.stat().st_size, memory_mb=memory, cpu_count=cpus)
    config = allocator.load()
    advice = allocator.advise(need, config)
    if config is None and getattr(args, "runtime", False) and not args.configure_allocator:
        # in a container (the runtime image) the host's allocator file is not visible: say what it must hold
        out.note(f"allocator: the host's {allocator.ALLOCATOR_FILE} must reserve at least {advice.memory_mib} MiB and "
                 f"{advice.cpu_count} CPUs for this enclave (not visible in this container)")
    elif not advice.ok:
        if not args.configure_allocator:
            out.note(advice.text + "\n(--configure-allocator raises the reservation in "
                     f"{allocator.ALLOCATOR_FILE} and restarts the allocator)")
        else:
            change = allocator.configure(allocator.ALLOCATOR_FILE, memory_mib=advice.memory_mib,
                                         cpu_count=advice.cpu_count, allowed=True)
            if change is not None:
                for line in change.summary:
                    out.note(f"allocator: {line}")
                allocator.restart()
    cli = NitroCli()
    enclave_args = RunEnclaveArgs(str(runnable.eif), cpus, memory, debug_mode=args.debug_mode,
                                  enclave_name=runnable.manifest.name)
    transport = VsockTransport()
    manifest = runnable.manifest
    egress = HostEgress(manifest.egress.policy(), transport) if manifest.egress.enabled else None
    side = HostSide(transport, manifest, egress=egress, **side_options)
    holder: list[NitroEnclave] = []

    def start() -> NitroEnclave:
        started = cli.run_enclave(enclave_args)
        out.note(f"started enclave {started.enclave_id}, CID {started.cid}, {started.cpu_count} CPUs, "
                 f"{started.memory_mib} MiB")
        holder.append(NitroEnclave(cli, started))
        return holder[0]

    try:
        return asyncio.run(run(side, start))
    finally:
        if holder and not holder[0].terminated:
            holder[0].stop()
