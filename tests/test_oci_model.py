"""References, digests, manifests, indexes and platform selection."""

from __future__ import annotations

import hashlib
import json

import pytest

from enclaver_rules.errors import OperationFailed
from enclaver_rules.oci import mediatypes as mt
from enclaver_rules.oci.digest import Digest
from enclaver_rules.oci.model import Index, Manifest, Platform, parse
from enclaver_rules.oci.reference import (
    BadReference,
    DaemonImage,
    DockerArchiveImage,
    OciLayoutImage,
    Reference,
    RegistryImage,
    parse_image,
)

H = "a" * 64


@pytest.mark.parametrize("text, host, repository, tag, digest", [
    ("busybox", "docker.io", "library/busybox", "latest", None),
    ("busybox:1.36", "docker.io", "library/busybox", "1.36", None),
    ("library/busybox", "docker.io", "library/busybox", "latest", None),
    ("user/app", "docker.io", "user/app", "latest", None),
    ("index.docker.io/user/app:v1", "docker.io", "user/app", "v1", None),
    ("localhost/app", "localhost", "app", "latest", None),
    ("localhost:5000/team/app:1.0", "localhost:5000", "team/app", "1.0", None),
    ("127.0.0.1:5000/app@sha256:" + H, "127.0.0.1:5000", "app", None, "sha256:" + H),
    ("ghcr.io/o/r:t@sha256:" + H, "ghcr.io", "o/r", "t", "sha256:" + H),
    ("public.ecr.aws/s2t1d4c6/enclaver-io/odyn:latest", "public.ecr.aws", "s2t1d4c6/enclaver-io/odyn", "latest", None),
    ("[::1]:5000/app:x", "[::1]:5000", "app", "x", None),
])
def test_reference_defaults(text: str, host: str, repository: str, tag: str | None, digest: str | None) -> None:
    ref = Reference.parse(text)
    assert (ref.registry, ref.repository, ref.tag, str(ref.digest) if ref.digest else None) == (
        host, repository, tag, digest)
    assert Reference.parse(str(ref)) == ref


def test_docker_hub_api_host() -> None:
    assert Reference.parse("busybox").api_host == "registry-1.docker.io"
    assert Reference.parse("localhost:5000/x").api_host == "localhost:5000"


@pytest.mark.parametrize("text, fix", [
    ("Busybox", "repository names are lowercase"),
    ("app@sha256:abc", "copy the digest exactly"),
    ("app:-x", "tags are letters"),
    ("a b", "give e.g."),
    ("ftp://x", "use a reference"),
    ("oci:", "write oci:PATH"),
])
def test_bad_references(text: str, fix: str) -> None:
    with pytest.raises(BadReference) as e:
        parse_image(text)
    assert fix in e.value.fix


def test_transports() -> None:
    assert parse_image("oci:/tmp/layout:v1") == OciLayoutImage("/tmp/layout", "v1")
    assert parse_image("oci:layout") == OciLayoutImage("layout", None)
    assert parse_image("docker-archive:/x/img.tar") == DockerArchiveImage("/x/img.tar")
    assert isinstance(parse_image("docker-daemon:app:1"), DaemonImage)
    assert parse_image("docker://alpine") == RegistryImage(Reference.parse("alpine"))


def test_digest_parse_and_format() -> None:
    data = b"hello"
    d = Digest.of(data)
    assert str(d) == "sha256:" + hashlib.sha256(data).hexdigest()
    assert Digest.parse(str(d)) == d
    for bad in ("sha256:" + "A" * 64, "sha256:abc", "md5:" + "0" * 32, "sha384:" + "0" * 64):
        with pytest.raises(ValueError):
            Digest.parse(bad)


def _index(*platforms: str) -> bytes:
    manifests = []
    for p in platforms:
        os_, arch, *variant = p.split("/")
        entry = {"mediaType": mt.OCI_MANIFEST, "digest": "sha256:" + hashlib.sha256(p.encode()).hexdigest(),
                 "size": 10, "platform": {"os": os_, "architecture": arch}}
        if variant:
            entry["platform"]["variant"] = variant[0]
        manifests.append(entry)
    return json.dumps({"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": manifests}).encode()


def test_platform_selection_is_host_independent() -> None:
    index = parse(_index("linux/amd64", "linux/arm64/v8", "linux/arm/v7"), None, "t")
    assert isinstance(index, Index)
    for asked, expected in (("linux/arm64", "linux/arm64/v8"), ("aarch64", "linux/arm64/v8"),
                            ("x86_64", "linux/amd64"), ("linux/arm/v7", "linux/arm/v7")):
        chosen = index.select(Platform.parse(asked), "t")
        assert chosen.digest.hex == hashlib.sha256(expected.encode()).hexdigest()
    with pytest.raises(OperationFailed) as e:
        index.select(Platform.parse("linux/s390x"), "t")
    assert "linux/amd64, linux/arm/v7, linux/arm64" in e.value.diagnostics[0].fix


def test_manifest_bytes_are_kept_exactly() -> None:
    raw = (b'{"schemaVersion": 2,  "mediaType": "' + mt.DOCKER_MANIFEST.encode() + b'", "config": {"mediaType": "'
           + mt.DOCKER_CONFIG.encode() + b'", "digest": "sha256:' + H.encode() + b'", "size": 3}, "layers": []}')
    m = parse(raw, None, "t")
    assert isinstance(m, Manifest) and m.raw == raw and m.digest == Digest.of(raw)


@pytest.mark.parametrize("raw, message", [
    (b'{"schemaVersion": 1, "fsLayers": []}', "schema 1"),
    (b"not json", "not JSON"),
    (b'{"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json", "config": {}, "layers": []}',
     "malformed descriptor"),
    (b'{"schemaVersion": 2, "mediaType": "application/x-foo"}', "not an image manifest"),
])
def test_bad_manifests(raw: bytes, message: str) -> None:
    with pytest.raises(OperationFailed, match=message):
        parse(raw, None, "t")
