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
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

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
