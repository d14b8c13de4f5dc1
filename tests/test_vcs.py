"""Release-image source labels: remote URLs lose their credentials; no git, no labels."""

from __future__ import annotations

from pathlib import Path

import pytest

from enclaver_rules.rules.vcs import public_url, source_labels


@pytest.mark.parametrize("url, public", [
    ("https://git.example.test/team/repo.git", "https://git.example.test/team/repo.git"),
    ("https://ci-bot:s3cr3t@git.example.test/team/repo.git", "https://git.example.test/team/repo.git"),
    ("https://x-access-token:ghs_abc@git.example.test:8443/r?token=1#f", "https://git.example.test:8443/r"),
    ("git@git.example.test:team/repo.git", "ssh://git.example.test/team/repo.git"),
    ("ssh://git@git.example.test:2222/team/repo.git", "ssh://git.example.test:2222/team/repo.git"),
    ("", ""),
])
def test_public_url_drops_credentials(url: str, public: str) -> None:
    assert public_url(url) == public


def test_outside_git_there_are_no_source_labels(tmp_path: Path) -> None:
    (tmp_path / "enclaver.yaml").write_text("version: v1\n")
    assert source_labels(str(tmp_path / "enclaver.yaml")) == {}
