"""The local Docker engine, through the docker SDK: a narrow adapter (has, save, load, pull).

Images leave the engine as a `docker save` stream read straight into the store, and go back in
as a generated `docker load` stream: never whole in memory, never through a temp file.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from typing import Any

from enclaver_rules.errors import OperationFailed

DEFAULT_HOST = "unix:///var/run/docker.sock"


class EngineUnavailable(OperationFailed):
    """No Docker engine answered."""


class _IterReader(io.RawIOBase):
    """A file-like view of an iterator of byte chunks (the SDK's streamed HTTP body)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self.chunks = chunks
        self.pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self.pending:
            try:
                self.pending = next(self.chunks)
            except StopIteration:
                return 0
        n = min(len(buffer), len(self.pending))
        buffer[:n] = self.pending[:n]
        self.pending = self.pending[n:]
        return n


class Engine:
    def __init__(self, host: str | None = None) -> None:
        self.host = host or os.environ.get("DOCKER_HOST") or DEFAULT_HOST
        self._client: Any = None

    @property
    def client(self) -> Any:
        if self._client is None:
            import docker

            try:
                client = docker.DockerClient(base_url=self.host, version="auto", timeout=120)
                client.ping()
            except Exception as e:  # noqa: BLE001 - the SDK raises many types for "not there"
                raise EngineUnavailable(f"no Docker engine at {self.host}: {type(e).__name__}: {e}",
                                        fix="start Docker, or point DOCKER_HOST at the engine") from None
            self._client = client
        return self._client

    def has(self, name: str) -> bool:
        return self.image_id(name) is not None

    def image_id(self, name: str) -> str | None:
        """The engine's ID of image `name` (the digest of its config: what it runs), None if absent."""
        import docker.errors

        try:
            found = self.client.api.inspect_image(name)
        except docker.errors.ImageNotFound:
            return None
        except docker.errors.APIError as e:
            if e.status_code == 404:
                return None
            raise OperationFailed(f"{self.host}: inspect {name}: {e}", fix="check the engine") from None
        return str(found["Id"])

    def save(self, name: str) -> io.BufferedReader:
        """The `docker save` tar of `name`, as a stream."""
        import docker.errors

        try:
            chunks = self.client.api.get_image(name, chunk_size=1 << 20)
        except docker.errors.APIError as e:
            raise OperationFailed(f"{self.host}: save {name}: {e}", fix="check the image name") from None
        return io.BufferedReader(_IterReader(iter(chunks)), 1 << 20)

    def load(self, archive: Iterator[bytes]) -> None:
        """Feed a `docker load` tar (a chunk iterator: sent with chunked encoding, not buffered)."""
        import docker.errors

        try:
            for line in self.client.api.load_image(archive, quiet=True):
                if isinstance(line, dict) and line.get("error"):
                    raise OperationFailed(f"{self.host}: load: {line['error']}", fix="check the image")
        except docker.errors.APIError as e:
            raise OperationFailed(f"{self.host}: load: {e}", fix="check the engine's log") from None

    def pull(self, repository: str, tag: str) -> None:
        import docker.errors

        try:
            for event in self.client.api.pull(repository, tag, stream=True, decode=True):
                if event.get("error"):
                    raise OperationFailed(f"{self.host}: pull {repository}:{tag}: {event['error']}",
                                          fix="check the name, and the engine's access to the registry")
        except docker.errors.APIError as e:
            raise OperationFailed(f"{self.host}: pull {repository}:{tag}: {e}", fix="check the name") from None


class Container:
    """One container the simulator started: kill, ask whether it runs, remove. Errors of an engine
    that went away are reported, never raised from `running` (a gone engine means a gone container)."""

    def __init__(self, engine: Engine, container_id: str) -> None:
        self.engine, self.id = engine, container_id

    def kill(self, signal: str = "SIGTERM") -> None:
        import docker.errors

        try:
            self.engine.client.api.kill(self.id, signal=signal)
        except docker.errors.APIError as e:  # already stopped: nothing to do
            if e.status_code not in (404, 409):
                raise OperationFailed(f"{self.engine.host}: kill {self.id[:12]}: {e}", fix="check the engine") from None

    def running(self) -> bool:
        import docker.errors

        try:
            return bool(self.engine.client.api.inspect_container(self.id)["State"]["Running"])
        except docker.errors.APIError:
            return False

    def exit_code(self) -> int | None:
        import docker.errors

        try:
            state = self.engine.client.api.inspect_container(self.id)["State"]
        except docker.errors.APIError:
            return None
        return None if state["Running"] else int(state["ExitCode"])

    def remove(self) -> None:
        import docker.errors

        try:
            self.engine.client.api.remove_container(self.id, force=True)
        except docker.errors.APIError as e:
            if e.status_code != 404:
                raise OperationFailed(f"{self.engine.host}: remove {self.id[:12]}: {e}",
                                      fix=f"remove it by hand: docker rm -f {self.id[:12]}") from None


def run_container(engine: Engine, image: str, entrypoint: list[str], *, binds: dict[str, str],
                  memory_mb: int, cpus: float, labels: dict[str, str], user: str | None = None) -> Container:
    """`docker run -d --network none --memory M --cpus C -v HOST:CONTAINER… --entrypoint …`, no command."""
    import docker.errors

    api = engine.client.api
    host_config = api.create_host_config(network_mode="none", mem_limit=f"{memory_mb}m",
                                         nano_cpus=int(cpus * 1e9), binds={h: {"bind": c, "mode": "rw"} for h, c in binds.items()})
    try:
        created = api.create_container(image, entrypoint=entrypoint, command=[], host_config=host_config,
                                       labels=labels, user=user)
        container = Container(engine, str(created["Id"]))
        try:
            api.start(container.id)
        except BaseException:
            container.remove()
            raise
    except docker.errors.APIError as e:
        raise OperationFailed(f"{engine.host}: cannot start {image}: {e}", fix="check the engine's log") from None
    return container
