"""`enclaver run --simulate`: the enclave image (the same odyn, app and manifest the EIF was made from)
in the real Docker engine, with the enclave's boundaries kept.

* The container has no network (`--network none`): the app reaches nothing but loopback, so every way
  out is odyn's policy-checking proxies, whose tunnels end at the host side (`HostEgress`, which checks
  the policy again), over Unix sockets standing in for vsock (`UnixTransport`; the directory is
  bind-mounted at VSOCK_DIR, odyn is CID 16, the host side CID 2).
* The simulated NSM runs in this process, on the host, and only its socket is mounted into the
  container (NSM_SOCKET): the CA's keys never enter it. Its PCRs are those recomputed from the EIF
  (all zero with --debug-mode, as on hardware).
* odyn runs as root (as in an enclave, whatever the image's USER), with only its transport, CID, NSM
  and IMDS flags added in front of `--`; bring-up is not skipped, since each step is a no-op in a
  container (the README's odyn section), so the same code path runs as in an enclave.
* Memory and CPUs: the manifest's `defaults` (or the flags) become the container's limits.
* The container is removed on every path out (an error, a signal, the app's end).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from enclaver_rules.errors import InvalidInput, OperationFailed
from enclaver_rules.link.transport import UnixTransport
from enclaver_rules.oci import enclave
from enclaver_rules.oci.digest import Digest
from enclaver_rules.oci.engine import Container, Engine, run_container
from enclaver_rules.oci.model import ImageConfig
from enclaver_rules.oci.store import Store
from enclaver_rules.ports import HOST_CID
from enclaver_rules.runtime import run as host
from enclaver_rules.runtime.runnable import Runnable

VSOCK_DIR = "/run/enclaver/vsock"
NSM_SOCKET = "/run/enclaver/nsm.sock"
ENCLAVE_CID = 16
LABEL = f"{enclave.LABEL}.simulator"


@dataclass
class SimOptions:
    memory_mb: int
    cpu_count: int
    debug_mode: bool = False
    sim_hosts: Mapping[str, tuple[str, int]] = field(default_factory=dict)
    imds: str | None = None
    ca_state: Path | None = None  # the simulator's CA: `enclaver attestation ca`'s default when None


def odyn_entrypoint(config: ImageConfig, imds: str | None) -> list[str]:
    """The enclave image's entrypoint (`/sbin/odyn … -- APP…`) with the simulator's flags for odyn."""
    argv = list(config.entrypoint)
    if not argv or argv[0] != enclave.ODYN_PATH or "--" not in argv:
        raise InvalidInput(f"the enclave image's entrypoint is {argv!r}, not {enclave.ODYN_PATH} … -- APP",
                           fix="rebuild it with this enclaver")
    cut = argv.index("--")
    extra = ["--transport", f"unix:{VSOCK_DIR}", "--cid", str(ENCLAVE_CID), "--nsm", f"unix:{NSM_SOCKET}"]
    if imds:
        extra += ["--imds", imds]
    return argv[:cut] + extra + argv[cut:]


def load_into_engine(engine: Engine, store: Store, digest: Digest, name: str) -> tuple[str, ImageConfig]:
    """The enclave image, loaded from the store into the engine unless the engine has it already
    (same config digest): its tag and config."""
    from enclaver_rules.oci.model import Manifest
    from enclaver_rules.oci.transfer import docker_archive, load_stored

    found = store.manifest(digest)
    assert isinstance(found, Manifest)
    config = ImageConfig.parse(store.read(found.config.digest), f"{digest.short} config")
    tag = f"enclaver-sim/{name}:{digest.hex[:16]}"
    if engine.image_id(tag) != str(found.config.digest):
        engine.load(docker_archive(load_stored(store, tag, digest), store, tag))
    return tag, config


class SimEnclave:
    def __init__(self, container: Container) -> None:
        self.container, self.cid = container, ENCLAVE_CID

    def stop(self) -> None:
        self.container.kill("SIGTERM")  # odyn forwards it to the app, then reports and drains

    def gone(self) -> bool:
        return not self.container.running()


async def simulate(runnable: Runnable, store: Store, engine: Engine, options: SimOptions,
                   side_options: dict[str, object]) -> int:
    """Run it, with the host side given `side_options` (publish, sinks, notifier…); the exit code."""
    from enclaver_rules.attestation.pcrs import parse_measurements
    from enclaver_rules.runtime.egress_host import HostEgress
    from enclaver_rules.runtime.sim_nsm import CertificateAuthority, SimulatedNsm, serve

    if runnable.enclave_image is None:
        raise OperationFailed(f"{runnable.source}: its enclave image is not in the store {store.root}",
                              fix="simulate from the repository that built it (or set ENC_CACHE_DIR)")
    tag, config = load_into_engine(engine, store, runnable.enclave_image, runnable.manifest.name)
    entrypoint = odyn_entrypoint(config, options.imds)
    nsm = SimulatedNsm(CertificateAuthority.open(options.ca_state),
                       parse_measurements(runnable.measurements, runnable.source), debug_mode=options.debug_mode)
    work = Path(tempfile.mkdtemp(prefix="enc-sim-", dir="/tmp"))  # short: socket paths are limited to 107 bytes
    container: Container | None = None
    server = None
    try:
        vsock = work / "vsock"
        vsock.mkdir()
        server = await serve(nsm, work / "nsm.sock")
        transport = UnixTransport(vsock, HOST_CID)
        manifest = runnable.manifest
        egress = HostEgress(manifest.egress.policy(), transport, static_hosts=dict(options.sim_hosts)) \
            if manifest.egress.enabled else None
        side = host.HostSide(transport, manifest, egress=egress, **side_options)  # type: ignore[arg-type]

        def start() -> SimEnclave:
            nonlocal container
            container = run_container(engine, tag, entrypoint, user="0",
                                      binds={str(vsock): VSOCK_DIR, str(work / "nsm.sock"): NSM_SOCKET},
                                      memory_mb=options.memory_mb, cpus=options.cpu_count,
                                      labels={LABEL: runnable.manifest.name})
            return SimEnclave(container)

        return await host.run(side, start)
    finally:
        if container is not None:
            await asyncio.to_thread(container.remove)
        if server is not None:
            server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 5)
        shutil.rmtree(work, ignore_errors=True)


# --- `--sim-kms` / `--sim-imds`: a local KMS and IMDS for the enclave's KMS proxy -------------------------

IMDS_ADDRESS = "169.254.169.254"
IMDS_URL = f"http://{IMDS_ADDRESS}"
SIM_PARENT_ROLE = "enclaver-sim-parent"
SIM_ADMIN_ROLE = "enclaver-sim-admin"
SIM_ACCOUNT = "111122223333"
SIM_REGION = "us-east-1"
CHILD_START_TIMEOUT = 60.0
CHILD_STOP_TIMEOUT = 10.0


@dataclass(frozen=True)
class SimKmsTarget:
    """Where the enclave's KMS proxy will send `region`'s calls: the manifest's `http://host:port`
    endpoint, which `--sim-kms` maps to the local KMS."""

    region: str
    host: str
    port: int


def sim_kms_target(manifest: Any) -> SimKmsTarget:
    """The manifest's plain-HTTP KMS endpoint (the first region, sorted, that has one); InvalidInput if
    there is none: the endpoints are measured, and the proxy speaks TLS to any other (a certificate the
    local KMS cannot have), so the manifest must name an `http://` one."""
    kms = manifest.kms_proxy
    if kms is None:
        raise InvalidInput("--sim-kms: the manifest has no kms_proxy", field="kms_proxy",
                           fix="add kms_proxy (with an http:// endpoint) to the manifest, or drop --sim-kms")
    for region, _ in kms.endpoints:
        endpoint = kms.endpoint(region)
        if not endpoint.tls:
            return SimKmsTarget(region, endpoint.host, endpoint.port)
    named = ", ".join(f"{r} → {e}" for r, e in kms.endpoints) or "none (AWS's kms.<region>.amazonaws.com, HTTPS)"
    raise InvalidInput(
        f"--sim-kms needs a plain-HTTP KMS endpoint in the manifest; kms_proxy.endpoints: {named}",
        field="kms_proxy.endpoints",
        fix="for a simulated build set kms_proxy.endpoints.<region> to an http:// endpoint, e.g. "
            "`us-east-1: http://kms.sim.internal:4566`, and allow that host under egress.allow (the KMS proxy "
            "speaks TLS to any other endpoint, which the local KMS cannot answer)")


def _new_identity() -> tuple[str, str]:
    """A random (access key id, secret access key) for one run."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
    akid = "AKIASIM" + "".join(secrets.choice(alphabet) for _ in range(13))
    return akid, secrets.token_urlsafe(30)


def kms_command(state: Path, ca_root: Path, region: str, identities: Mapping[str, tuple[str, str]], *,
                account: str = SIM_ACCOUNT) -> list[str]:
    argv = [sys.executable, "-m", "enclaver_rules.cli", "kms", "serve", "--state", str(state), "--port", "0",
            "--host", "127.0.0.1", "--region", region, "--account", account, "--attestation-root", str(ca_root),
            "--no-aws-root"]
    for akid, (secret, arn) in identities.items():
        argv += ["--identity", f"{akid}:{secret}={arn}"]
    return argv


def imds_command(identity: tuple[str, str], region: str, *, account: str = SIM_ACCOUNT) -> list[str]:
    return [sys.executable, "-m", "enclaver_rules.cli", "imds", "serve", "--port", "0", "--host", "127.0.0.1",
            "--role", SIM_PARENT_ROLE, "--identity", f"{identity[0]}:{identity[1]}", "--region", region,
            "--account", account, "--json"]


@dataclass
class SimServices:
    """The local KMS and/or IMDS `--sim-kms`/`--sim-imds` started; `stop` ends them (SIGTERM, then kill)."""

    static_hosts: dict[str, tuple[str, int]] = field(default_factory=dict)  # for HostEgress
    imds: str | None = None  # odyn's --imds
    kms_endpoint: str | None = None
    imds_endpoint: str | None = None
    parent_arn: str | None = None
    admin_akid: str | None = None
    credentials: Path | None = None
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list, repr=False)
    logs: list[Path] = field(default_factory=list)

    def notes(self) -> list[str]:
        lines = []
        if self.kms_endpoint:
            lines += [f"sim-kms: local KMS at {self.kms_endpoint}",
                      f"sim-kms: the parent (the enclave's KMS proxy, via IMDS) is {self.parent_arn}",
                      f"sim-kms: admin access key {self.admin_akid}; its secret is in {self.credentials} "
                      f"(profile {SIM_ADMIN_ROLE}); e.g. AWS_SHARED_CREDENTIALS_FILE={self.credentials} aws "
                      f"--profile {SIM_ADMIN_ROLE} --endpoint-url {self.kms_endpoint} kms create-key …"]
        if self.imds_endpoint:
            lines.append(f"sim-imds: local IMDS at {self.imds_endpoint} (role {SIM_PARENT_ROLE}); odyn --imds {self.imds}")
        lines += [f"sim-host: {name} → {ip}:{port}" for name, (ip, port) in self.static_hosts.items()]
        return lines

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(CHILD_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _spawn(argv: list[str], out_path: Path, err_path: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENC_") and not k.startswith("AWS_")}
    with open(out_path, "wb") as stdout, open(err_path, "ab") as stderr:
        return subprocess.Popen(argv, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL, env=env)


def _wait_output(process: subprocess.Popen[bytes], out_path: Path, err_path: Path, done: Callable[[str], bool],
                 what: str) -> str:
    """The child's stdout once `done(text)` (its ready line or document); OperationFailed if it exits or takes
    too long."""
    deadline = time.monotonic() + CHILD_START_TIMEOUT
    while True:
        text = out_path.read_text(errors="replace")
        if done(text):
            return text
        if process.poll() is not None or time.monotonic() > deadline:
            raise OperationFailed(f"{what} did not get ready (exit {process.poll()}): "
                                  f"{err_path.read_text(errors='replace')[-2000:]}")
        time.sleep(0.05)


def _json_done(text: str) -> bool:
    return any(line == "}" for line in text.splitlines())


def start_sim_services(*, kms_state: Path | None, imds: bool, ca_root: Path | None, manifest: Any,
                       log_dir: Path) -> SimServices:
    """Start `enclaver kms serve` (when `kms_state`) and `enclaver imds serve` (when `imds` or `kms_state`)
    as children, with random credentials for this run; the static hosts that bring the manifest's http://
    KMS endpoint host and 169.254.169.254 to them. The caller must `stop()` the result on every path."""
    target = sim_kms_target(manifest) if kms_state is not None else None
    region = target.region if target else SIM_REGION
    services = SimServices()
    parent = _new_identity()
    services.parent_arn = f"arn:aws:iam::{SIM_ACCOUNT}:role/{SIM_PARENT_ROLE}"
    try:
        if kms_state is not None and target is not None:
            if ca_root is None:
                raise InvalidInput("--sim-kms needs the simulator CA's root", field="--sim-state")
            kms_state.mkdir(parents=True, exist_ok=True, mode=0o700)
            admin = _new_identity()
            services.admin_akid = admin[0]
            services.credentials = kms_state / "credentials"
            fd = os.open(services.credentials, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(f"[{SIM_ADMIN_ROLE}]\naws_access_key_id = {admin[0]}\naws_secret_access_key = {admin[1]}\n"
                        f"region = {region}\n")
            identities = {parent[0]: (parent[1], services.parent_arn),
                          admin[0]: (admin[1], f"arn:aws:iam::{SIM_ACCOUNT}:role/{SIM_ADMIN_ROLE}")}
            out_path, err_path = log_dir / "kms.out", log_dir / "kms.log"
            process = _spawn(kms_command(kms_state, ca_root, region, identities), out_path, err_path)
            services.processes.append(process)
            services.logs.append(err_path)
            line = _wait_output(process, out_path, err_path, lambda t: "\n" in t, "the local KMS").split("\n")[0]
            if not line.startswith("ready http://"):
                raise OperationFailed(f"the local KMS said {line!r}, not `ready http://…`")
            services.kms_endpoint = line.split()[1]
            where = urllib.parse.urlsplit(services.kms_endpoint)
            services.static_hosts[target.host] = (where.hostname or "127.0.0.1", where.port or 80)
        if imds or kms_state is not None:
            out_path, err_path = log_dir / "imds.out", log_dir / "imds.log"
            process = _spawn(imds_command(parent, region), out_path, err_path)
            services.processes.append(process)
            services.logs.append(err_path)
            facts = json.loads(_wait_output(process, out_path, err_path, _json_done, "the local IMDS"))
            services.imds_endpoint = str(facts["url"])
            services.imds = IMDS_URL
            services.static_hosts[IMDS_ADDRESS] = ("127.0.0.1", int(facts["port"]))
        return services
    except BaseException:
        services.stop()
        raise
