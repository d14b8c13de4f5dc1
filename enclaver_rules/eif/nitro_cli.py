"""Second EIF backend: AWS's nitro-cli in a container, as upstream enclaver runs it.

The contract (../shared/reference/enclaver-compat.md §3): the enclave image is put into the
Docker engine under a tag (nitro-cli pulls by name); a nitro-cli image (entrypoint `nitro-cli`)
runs `build-enclave --docker-uri TAG --output-file /build/application.eif [--signing-certificate
/var/run/certificate --private-key /var/run/key]` with the engine's socket at
/var/run/docker.sock, a fresh directory at /build and the signing files bind-mounted; stderr is
progress (logged line by line); exit code 0 is required; stdout is `{"Measurements": {...}}`; the
EIF is taken out of /build. The container and the tag are removed whatever happens.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from enclaver_rules.eif.measure import Measurements
from enclaver_rules.errors import InvalidInput, OperationFailed
from enclaver_rules.oci.engine import Engine
from enclaver_rules.oci.store import Store, atomic_file

if TYPE_CHECKING:
    from enclaver_rules.oci.transfer import StoredImage

DEFAULT_IMAGE = "public.ecr.aws/s2t1d4c6/enclaver-io/nitro-cli:latest"
SOCKET = "/var/run/docker.sock"
log = logging.getLogger("enclaver.nitro-cli")


@dataclass(frozen=True, slots=True)
class NitroCliRun:
    measurements: Measurements
    stderr: tuple[str, ...]


def arguments(tag: str, signed: bool) -> list[str]:
    args = ["build-enclave", "--docker-uri", tag, "--output-file", "/build/application.eif"]
    if signed:
        args += ["--signing-certificate", "/var/run/certificate", "--private-key", "/var/run/key"]
    return args


def parse_output(stdout: str) -> Measurements:
    """nitro-cli's stdout: pretty JSON `{"Measurements": {"HashAlgorithm", "PCR0", "PCR1", "PCR2", "PCR8"?}}`."""
    try:
        data = json.loads(stdout)
        m = data["Measurements"]
        pcrs = [m["PCR0"], m["PCR1"], m["PCR2"]]
        if not all(isinstance(p, str) and len(p) == 96 and int(p, 16) >= 0 for p in pcrs):
            raise ValueError("PCRs are not 96 hex digits")
    except (ValueError, KeyError, TypeError) as e:
        raise OperationFailed(f"nitro-cli printed no usable measurements ({e}): {stdout[:300]!r}",
                              fix="check that the nitro-cli image is aws-nitro-enclaves-cli's build-enclave") from None
    pcr8 = m.get("PCR8")
    return Measurements(pcrs[0], pcrs[1], pcrs[2], pcr8 if isinstance(pcr8, str) else None)


def diagnose(stderr: list[str]) -> str:
    """Upstream's two known failure signatures in nitro-cli's stderr, turned into a fix."""
    text = "\n".join(stderr)
    if "no space left on device" in text:
        return "the Docker engine's disk is full: free space (docker system prune) and build again"
    if stderr and stderr[-1].rstrip().endswith(("cmd", "env")):
        return "linuxkit stopped after writing cmd/env: the machine probably ran out of memory; add RAM or swap"
    return "see nitro-cli's output above; the pure backend (the default) needs no Docker engine"


def _socket_path(engine: Engine) -> str:
    if not engine.host.startswith("unix://"):
        raise InvalidInput(f"the nitro-cli backend needs a local engine socket, not {engine.host}", file="DOCKER_HOST",
                           fix="use a unix:// DOCKER_HOST, or the pure backend")
    return engine.host[len("unix://"):]


def build(engine: Engine, tag: str, output: Path, *, image: str = DEFAULT_IMAGE,
          signing: tuple[Path, Path] | None = None, workdir: str | None = None) -> NitroCliRun:
    """Run nitro-cli on the image tagged `tag` in `engine`; write the EIF to `output` atomically."""
    import docker.errors

    client: Any = engine.client
    with tempfile.TemporaryDirectory(prefix="enclaver-nitro-cli-", dir=workdir) as build_dir:
        volumes = {_socket_path(engine): {"bind": SOCKET, "mode": "rw"}, build_dir: {"bind": "/build", "mode": "rw"}}
        if signing:
            volumes[str(Path(signing[0]).resolve())] = {"bind": "/var/run/certificate", "mode": "ro"}
            volumes[str(Path(signing[1]).resolve())] = {"bind": "/var/run/key", "mode": "ro"}
        try:
            container = client.containers.create(image, command=arguments(tag, signing is not None), volumes=volumes,
                                                 working_dir="/build", network_mode="none")
        except docker.errors.ImageNotFound:
            raise OperationFailed(f"the nitro-cli image {image} is not in the engine at {engine.host}",
                                  fix=f"docker pull {image}, or name another with --nitro-cli-image") from None
        except docker.errors.APIError as e:
            raise OperationFailed(f"cannot create the nitro-cli container: {e}", fix="check the engine") from None
        stderr: list[str] = []
        try:
            container.start()
            for raw in container.logs(stream=True, follow=True, stdout=False, stderr=True):
                for line in raw.decode("utf-8", "replace").splitlines():
                    stderr.append(line)
                    log.info("nitro-cli: %s", line)
            code = int(container.wait().get("StatusCode", -1))
            stdout = container.logs(stdout=True, stderr=False).decode("utf-8", "replace")
        finally:
            with contextlib.suppress(docker.errors.APIError):
                container.remove(force=True)
        if code != 0:
            tail = "; ".join(stderr[-3:]) or "no output"
            raise OperationFailed(f"nitro-cli exited with code {code} ({tail})", fix=diagnose(stderr))
        measurements = parse_output(stdout)
        produced = Path(build_dir) / "application.eif"
        if not produced.is_file():
            raise OperationFailed("nitro-cli reported success but wrote no /build/application.eif",
                                  fix="check the nitro-cli image's version")
        with atomic_file(output) as out, open(produced, "rb") as source:
            shutil.copyfileobj(source, out, 1 << 20)  # a copy, not a rename: /build may be another file system
    return NitroCliRun(measurements, tuple(stderr))


def build_stored(image: StoredImage, store: Store, output: Path, *, nitro_cli_image: str = DEFAULT_IMAGE,
                 signing: tuple[Path, Path] | None = None, engine: Engine | None = None,
                 workdir: str | None = None) -> NitroCliRun:
    """Upstream's path for an image in our store: load it into the engine under a build tag (nitro-cli
    reads images by name), run nitro-cli on it, remove the tag whatever happens."""
    import docker.errors

    from enclaver_rules.oci.transfer import docker_archive

    engine = engine or Engine()
    tag = f"enclaver-build/{image.digest.hex[:12]}:{image.digest.hex[12:24]}"
    engine.load(docker_archive(image, store, tag))
    try:
        return build(engine, tag, output, image=nitro_cli_image, signing=signing, workdir=workdir)
    finally:
        with contextlib.suppress(docker.errors.APIError):
            engine.client.images.remove(tag, noprune=False)
