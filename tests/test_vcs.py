"""Release-image source labels: remote URLs lose their credentials and a local path is never a
label; a tree that differs from its commit is labelled `<commit>+dirty`; no git, no labels."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from enclaver_rules.rules import vcs
from enclaver_rules.rules.vcs import REVISION, SOURCE, public_url, source_labels


@pytest.mark.parametrize("url, public", [
    ("https://git.example.test/team/repo.git", "https://git.example.test/team/repo.git"),
    ("https://ci-bot:s3cr3t@git.example.test/team/repo.git", "https://git.example.test/team/repo.git"),
    ("https://x-access-token:ghs_abc@git.example.test:8443/r?token=1#f", "https://git.example.test:8443/r"),
    ("git@git.example.test:team/repo.git", "ssh://git.example.test/team/repo.git"),
    ("git.example.test:team/repo.git", "ssh://git.example.test/team/repo.git"),
    ("ssh://git@git.example.test:2222/team/repo.git", "ssh://git.example.test:2222/team/repo.git"),
    ("git://git.example.test/team/repo.git", "git://git.example.test/team/repo.git"),
    ("HTTPS://git.example.test/team/repo.git", "https://git.example.test/team/repo.git"),
    ("ssh://git@[2001:db8::1]:22/team/repo.git", "ssh://[2001:db8::1]:22/team/repo.git"),
    ("", ""),
])
def test_public_url_drops_credentials(url: str, public: str) -> None:
    assert public_url(url) == public


@pytest.mark.parametrize("url", [
    "/home/me/repo",                      # an absolute path
    "/home/me/repo.git/",
    "../repo",                            # relative paths
    "./repo",
    "repo",
    "~/src/repo",
    "file:///home/me/repo",               # file URLs, with or without a host
    "file://buildhost/home/me/repo",
    "FILE:///home/me/repo",
    "C:/Users/me/repo",                   # a Windows build host
    "C:\\Users\\me\\repo",
    "\\\\server\\share\\repo",
    "ssh://localhost/home/me/repo",       # loopback: a path on the build host by another name
    "git@127.0.0.1:home/me/repo",
    "http://[::1]:8080/repo",
    "me@localhost:repo",
    "ext::ssh -i /home/me/.ssh/key host %S /repo",  # remote helpers
    "codecommit::us-east-1://repo",
    "https://bad-port:x/repo",
])
def test_a_local_path_is_never_a_label(url: str) -> None:
    assert public_url(url) == ""


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., str]]:
    """A git repository at tmp_path/repo with services/alpha/enclaver.yaml committed; returns a
    `git(*args)` helper. The per-process answer cache is cleared around each question."""
    for k, v in {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.test", "GIT_COMMITTER_NAME": "t",
                 "GIT_COMMITTER_EMAIL": "t@example.test", "GIT_CONFIG_GLOBAL": "/dev/null",
                 "GIT_CONFIG_NOSYSTEM": "1"}.items():
        monkeypatch.setenv(k, v)
    root = tmp_path / "repo"
    (root / "services" / "alpha").mkdir(parents=True)
    (root / "services" / "beta").mkdir(parents=True)
    (root / "services" / "alpha" / "enclaver.yaml").write_text("version: v1\n")
    (root / "services" / "beta" / "enclaver.yaml").write_text("version: v1\n")
    (root / "README").write_text("monorepo\n")
    (root / ".gitignore").write_text("/cache/\n*.key\n")

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True,
                              text=True).stdout.strip()

    git("init", "-q")
    git("add", "-A")
    git("commit", "-q", "-m", "one")
    vcs._ask.cache_clear()
    yield git
    vcs._ask.cache_clear()


def labels_of(root: Path, name: str = "alpha") -> dict[str, str]:
    vcs._ask.cache_clear()
    return source_labels(str(root / "services" / name / "enclaver.yaml"))


def test_a_clean_tree_is_labelled_with_its_commit_alone(repo: Callable[..., str], tmp_path: Path) -> None:
    root = tmp_path / "repo"
    (root / "cache").mkdir()
    (root / "cache" / "out.json").write_text("{}")  # ignored outputs are not changes
    (root / "services" / "alpha" / "signing.key").write_text("secret")  # nor ignored files beside the manifest
    (root / "services" / "beta" / "notes.txt").write_text("scratch")  # nor another enclave's scratch files
    (root / "scratch.txt").write_text("scratch")  # nor scratch files above the manifest
    assert labels_of(root) == {REVISION: repo("rev-parse", "HEAD")}


@pytest.mark.parametrize("change", ["edit", "stage", "delete", "rename", "edit elsewhere"])
def test_a_tracked_change_anywhere_labels_the_commit_dirty(repo: Callable[..., str], tmp_path: Path,
                                                            change: str) -> None:
    root = tmp_path / "repo"
    manifest = root / "services" / "alpha" / "enclaver.yaml"
    if change == "edit":
        manifest.write_text("version: v1\nname: edited\n")
    elif change == "stage":
        manifest.write_text("version: v1\nname: staged\n")
        repo("add", str(manifest))
    elif change == "delete":
        (root / "services" / "beta" / "enclaver.yaml").unlink()
    elif change == "rename":
        repo("mv", "README", "README.md")
    else:
        (root / "README").write_text("edited: a manifest may reach outside its directory\n")
    assert labels_of(root) == {REVISION: repo("rev-parse", "HEAD") + "+dirty"}


def test_untracked_files_beside_the_manifest_leave_it_clean(repo: Callable[..., str], tmp_path: Path) -> None:
    """An app layout built from sources, doit's __pycache__, a blob set: pinned by their own digest
    labels, and made by the build itself, so they do not make the commit a lie."""
    root = tmp_path / "repo"
    for where in ("services/alpha/app/index.json", "services/alpha/__pycache__/dodo.pyc", "services/alpha/x.yaml"):
        (root / where).parent.mkdir(parents=True, exist_ok=True)
        (root / where).write_text("made by the build")
    assert labels_of(root)[REVISION] == repo("rev-parse", "HEAD")


def test_an_uncommitted_or_ignored_manifest_is_dirty(repo: Callable[..., str], tmp_path: Path) -> None:
    root = tmp_path / "repo"
    (root / "services" / "gamma").mkdir()
    (root / "services" / "gamma" / "enclaver.yaml").write_text("version: v1\n")  # in a new untracked directory
    (root / "services" / "alpha" / "other.yaml").write_text("version: v1\n")  # beside committed files
    (root / "services" / "delta").mkdir()
    (root / "services" / "delta" / "enclaver.yaml").write_text("version: v1\n")
    (root / ".git" / "info" / "exclude").write_text("services/delta/enclaver.yaml\n")  # ignored
    head = repo("rev-parse", "HEAD")
    vcs._ask.cache_clear()
    assert source_labels(str(root / "services" / "gamma" / "enclaver.yaml"))[REVISION] == head + "+dirty"
    assert source_labels(str(root / "services" / "alpha" / "other.yaml"))[REVISION] == head + "+dirty"
    assert source_labels(str(root / "services" / "delta" / "enclaver.yaml"))[REVISION] == head + "+dirty"
    assert source_labels(str(root / "services" / "alpha" / "enclaver.yaml"))[REVISION] == head  # committed: clean
    repo("add", "services/gamma")
    assert labels_of(root, "gamma")[REVISION] == head + "+dirty"  # staged, not committed
    repo("commit", "-q", "-m", "two")
    assert labels_of(root, "gamma")[REVISION] == repo("rev-parse", "HEAD")  # committed: clean again


def test_a_manifest_at_the_top_level_or_through_a_symlink(repo: Callable[..., str], tmp_path: Path) -> None:
    root = tmp_path / "repo"
    (root / "enclaver.yaml").write_text("version: v1\n")
    (root / "linked.yaml").symlink_to("services/alpha/enclaver.yaml")
    repo("add", "enclaver.yaml", "linked.yaml")
    repo("commit", "-q", "-m", "top")
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / "dodo.cpython-311.pyc").write_bytes(b"")  # what `doit` leaves beside dodo.py
    for name in ("enclaver.yaml", "linked.yaml"):
        vcs._ask.cache_clear()
        assert source_labels(str(root / name)) == {REVISION: repo("rev-parse", "HEAD")}
    (root / "services" / "beta" / "enclaver.yaml").write_text("version: v1\nname: beta\n")
    vcs._ask.cache_clear()
    assert source_labels(str(root / "enclaver.yaml"))[REVISION].endswith("+dirty")


@pytest.mark.parametrize("origin, source", [
    ("/home/me/repo", None),
    ("../repo", None),
    ("file:///home/me/repo", None),
    ("https://ci:tok@git.example.test/team/repo.git", "https://git.example.test/team/repo.git"),
    ("git@git.example.test:team/repo.git", "ssh://git.example.test/team/repo.git"),
])
def test_the_source_label_is_a_network_url_or_nothing(repo: Callable[..., str], tmp_path: Path,
                                                      origin: str, source: str | None) -> None:
    repo("remote", "add", "origin", origin)
    labels = labels_of(tmp_path / "repo")
    assert labels.get(SOURCE) == source
    assert labels[REVISION] == repo("rev-parse", "HEAD")  # the remote does not make the tree dirty
    assert "/home/me" not in repr(labels) and "tok" not in repr(labels)


def test_outside_git_there_are_no_source_labels(tmp_path: Path) -> None:
    (tmp_path / "enclaver.yaml").write_text("version: v1\n")
    assert source_labels(str(tmp_path / "enclaver.yaml")) == {}
