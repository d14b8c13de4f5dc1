"""The real services later issues test against start here, or the run fails loudly."""

from __future__ import annotations

import json
import urllib.request

import docker
import pytest

pytestmark = pytest.mark.services


def test_dockerd_answers(dockerd) -> None:
    client = docker.DockerClient(base_url=dockerd.host, version="auto")
    try:
        assert client.ping()
        info = client.info()
        assert info["Driver"] == "vfs"
    finally:
        client.close()


def test_registry_answers_v2(registry) -> None:
    with urllib.request.urlopen(f"{registry.url}/v2/_catalog", timeout=5) as response:
        assert response.status == 200
        assert isinstance(json.load(response)["repositories"], list)


def test_registry_has_no_referrers_api(registry) -> None:
    """distribution 2.8 has no OCI 1.1 referrers endpoint: the push step must use the tag fallback."""
    url = f"{registry.url}/v2/x/referrers/sha256:{'0' * 64}"
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(url, timeout=5)
    assert e.value.code == 404
