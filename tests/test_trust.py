"""`enclaver trust` and task `trust:<name>` without services: which registry host a reference is read
from, what stdout carries (the policy alone must be pipe-able), and the one rule for the KMS account
shared by the CLI and the task (no placeholder account: none given is an error)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from enclaver_rules.cli.trust import measurements_of

# -- the registry API host ---------------------------------------------------------------------


class _Stop(Exception):
    """Raised by the fake registry client: the test only wants to know how it was built."""


@pytest.mark.parametrize(("ref", "host", "insecure"), [
    ("docker.io/library/x", "registry-1.docker.io", False),
    ("x", "registry-1.docker.io", False),
    ("index.docker.io/someone/x:1", "registry-1.docker.io", False),
    ("localhost:5000/x", "localhost:5000", False),
    ("registry.internal:5000/team/x", "registry.internal:5000", True),
])
def test_a_release_image_not_in_the_store_is_read_from_its_registrys_api_host(
        ref: str, host: str, insecure: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Docker Hub's name (docker.io) serves no registry API: the client must talk to registry-1.docker.io,
    the host `enclaver image pull` uses (Reference.api_host)."""
    built: list[tuple[str, bool]] = []

    def fake_registry(host: str, *, insecure: bool = False, **_: Any) -> Any:
        built.append((host, insecure))
        raise _Stop

    monkeypatch.setattr("enclaver_rules.oci.registry.Registry", fake_registry)
    monkeypatch.chdir(tmp_path)  # `x` must not name a file here
    with pytest.raises(_Stop):
        measurements_of(ref, str(tmp_path / "empty-store"), insecure=frozenset({"registry.internal:5000"}))
    assert built == [(host, insecure)]
