"""`enclaver image push SRC DST` between two registries streams blobs from one to the other
(`oci/relay.py`): verified as they pass, never whole at the destination when they do not match,
and without a round trip through the store. The registries are the small in-process ones of
`test_cache_integrity` (no services)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from test_cache_integrity import _Handler, _serve_image, _start

from conftest import Result
from enclaver_rules.cli.exit_codes import ExitCode
from enclaver_rules.oci.digest import Digest, DigestMismatch
from enclaver_rules.oci.model import Descriptor
from enclaver_rules.oci.relay import RelayBody
from enclaver_rules.oci.store import CHUNK, Store

Cli = Callable[..., Result]
Registry = tuple[str, type[_Handler]]


@pytest.fixture
def source() -> Iterator[Registry]:
    server, host, handler = _start()
    yield host, handler
    server.shutdown()


@pytest.fixture
def destination() -> Iterator[Registry]:
    server, host, handler = _start()
    yield host, handler
    server.shutdown()


def test_copy_streams_every_blob_once_and_keeps_no_layer_in_the_store(
        cli: Cli, source: Registry, destination: Registry, tmp_path: Path) -> None:
    (host, src), (dest_host, dst) = source, destination
    digests = _serve_image(src)
    result = cli("image", "push", f"{host}/app:1", f"{dest_host}/copy:1", "--cache-dir", str(tmp_path / "c"))
    assert result.code == ExitCode.OK, result.stderr
    assert digests["manifest"] in result.stdout
    assert dst.manifests["1"][0] == src.manifests["1"][0]
    for role in ("layer-gz", "layer-plain", "config"):
        assert dst.blobs[digests[role]] == src.blobs[digests[role]]
        assert src.gets[digests[role]] == 1
        assert not Store(tmp_path / "c").has(Digest.parse(digests[role]))


@pytest.mark.parametrize("how", ["flip", "longer", "shorter"])
def test_a_tampered_layer_is_refused_and_the_destination_never_gets_it_whole(
        cli: Cli, source: Registry, destination: Registry, tmp_path: Path, how: str) -> None:
    (host, src), (dest_host, dst) = source, destination
    digests = _serve_image(src)
    layer = digests["layer-plain"]
    good = src.blobs[layer]
    src.blobs[layer] = {"flip": good[:-1] + bytes([good[-1] ^ 1]), "longer": good + b"x",
                        "shorter": good[:-1]}[how]
    result = cli("image", "push", f"{host}/app:1", f"{dest_host}/copy:1", "--cache-dir", str(tmp_path / "c"))
    assert result.code == ExitCode.FAILURE
    assert "nothing was kept" in result.stderr and layer[:19] in result.stderr
    assert layer not in dst.blobs and "1" not in dst.manifests


class _Response:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def iter_content(self, size: int) -> Iterator[bytes]:
        for i in range(0, len(self.data), size):
            yield self.data[i:i + size]


def test_the_last_chunk_is_held_back_until_the_blob_verifies() -> None:
    """A body that turns out not to match must never reach its declared length at the destination."""
    data = os.urandom(3 * CHUNK + 5)
    descriptor = Descriptor("application/octet-stream", Digest.of(data), len(data))
    sent: list[bytes] = []
    body = RelayBody(_Response(data[:-1] + b"?"), descriptor, "test", None)  # type: ignore[arg-type]
    assert len(body) == len(data)
    with pytest.raises(DigestMismatch):
        for chunk in body:
            sent.append(chunk)
    assert sum(map(len, sent)) == 3 * CHUNK < len(data)
    good = RelayBody(_Response(data), descriptor, "test", None)  # type: ignore[arg-type]
    assert b"".join(good) == data
    with pytest.raises(Exception, match="refused after its body was sent"):
        list(good)  # one-shot: a replay fails loudly instead of sending nothing


def test_blobs_the_store_keeps_go_out_from_the_store(
        cli: Cli, source: Registry, destination: Registry, tmp_path: Path) -> None:
    (host, src), (dest_host, dst) = source, destination
    digests = _serve_image(src)
    cache = str(tmp_path / "c")
    assert cli("image", "pull", f"{host}/app:1", "--cache-dir", cache).code == ExitCode.OK
    result = cli("image", "push", f"{host}/app:1", f"{dest_host}/copy:1", "--cache-dir", cache)
    assert result.code == ExitCode.OK, result.stderr
    for role in ("layer-gz", "layer-plain", "config"):
        assert src.gets[digests[role]] == 1 and dst.blobs[digests[role]] == src.blobs[digests[role]]
