"""The store: atomic verified writes, refs under a lock, concurrent writers, verify and gc."""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
from pathlib import Path

import pytest

from enclaver_rules.oci.digest import Digest, DigestMismatch
from enclaver_rules.oci.model import Descriptor
from enclaver_rules.oci.store import Staging, Store, default_cache_dir


def leftovers(store: Store) -> list[str]:
    return [p.name for p in store.blobs.iterdir() if p.name.startswith(".")]


def test_put_names_blob_by_content(tmp_path: Path) -> None:
    store = Store(tmp_path).init()
    d = store.put_bytes(b"abc")
    assert d.hex == hashlib.sha256(b"abc").hexdigest()
    assert (store.blobs / d.hex).read_bytes() == b"abc"
    assert store.put_bytes(b"abc", expect=d) == d  # idempotent
    assert (tmp_path / "oci-layout").read_bytes() == b'{"imageLayoutVersion":"1.0.0"}'


@pytest.mark.parametrize("data, size, message", [
    (b"abd", 3, "content is"),
    (b"ab", 3, "got 2 of 3 bytes"),
    (b"abcd", 3, "more than the declared 3 bytes"),
])
def test_mismatch_keeps_nothing(tmp_path: Path, data: bytes, size: int, message: str) -> None:
    store = Store(tmp_path).init()
    expect = Digest.of(b"abc")
    with pytest.raises(DigestMismatch, match=message):
        store.put([data[:2], data[2:]], expect, size, source="test")
    assert not store.has(expect) and list(store.blobs.iterdir()) == []


def test_interrupted_write_keeps_nothing(tmp_path: Path) -> None:
    store = Store(tmp_path).init()

    def chunks():  # type: ignore[no-untyped-def]
        yield b"partial"
        raise ConnectionError("peer went away")

    with pytest.raises(ConnectionError):
        store.put(chunks())
    assert list(store.blobs.iterdir()) == []


def test_tag_resolve_untag(tmp_path: Path) -> None:
    store = Store(tmp_path).init()
    d = store.put_bytes(b"{}")
    desc = Descriptor("application/vnd.oci.image.manifest.v1+json", d, 2)
    store.tag("example.com/a:1", desc)
    store.tag("example.com/a:2", desc)
    assert set(store.refs()) == {"example.com/a:1", "example.com/a:2"}
    assert store.resolve("example.com/a:1") == Descriptor(desc.media_type, d, 2, (
        ("org.opencontainers.image.ref.name", "example.com/a:1"),))
    assert store.untag("example.com/a:1") and not store.untag("example.com/a:1")


def _writer(root: str, n: int, name: str) -> None:
    store = Store(root)
    payload = b"x" * (4 << 20)
    for i in range(n):
        d = store.put([payload[j:j + 65536] for j in range(0, len(payload), 65536)])
        store.tag(f"{name}:{i}", Descriptor("application/octet-stream", d, len(payload)))


def test_two_processes_writing_at_once(tmp_path: Path) -> None:
    Store(tmp_path).init()
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), 10, name)) for name in ("p", "q")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    store = Store(tmp_path)
    assert len(store.refs()) == 20
    assert store.verify() == [] and leftovers(store) == []


def test_verify_finds_tampering(tmp_path: Path) -> None:
    store = Store(tmp_path).init()
    d = store.put_bytes(b"good")
    path = store.path(d)
    os.chmod(path, 0o644)
    path.write_bytes(b"evil")
    [problem] = store.verify()
    assert problem.path == str(path) and "content is sha256:" in problem.message


def test_gc_drops_only_unreachable(tmp_path: Path) -> None:
    import json

    store = Store(tmp_path).init()
    layer = store.put_bytes(b"layer")
    config = store.put_bytes(b"{}")
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": str(config),
                                      "size": 2},
                           "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": str(layer),
                                       "size": 5}]}).encode()
    m = store.put_bytes(manifest)
    orphan = store.put_bytes(b"orphan")
    store.tag("r", Descriptor("application/vnd.oci.image.manifest.v1+json", m, len(manifest)))
    assert store.gc() == (0, 0)  # everything is fresh: inside the grace period
    assert store.gc(grace_seconds=0) == (1, 6)
    assert not store.has(orphan) and all(store.has(d) for d in (layer, config, m))


def test_cache_dir_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENC_CACHE_DIR", str(tmp_path / "x"))
    assert default_cache_dir() == tmp_path / "x"
    monkeypatch.delenv("ENC_CACHE_DIR")
    (tmp_path / "repo" / "cache").mkdir(parents=True)
    (tmp_path / "repo" / "dodo.py").write_text("")
    (tmp_path / "repo" / "sub").mkdir()
    assert default_cache_dir(str(tmp_path / "repo" / "sub")) == tmp_path / "repo" / "cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir(str(tmp_path)) == tmp_path / "xdg" / "enclaver"


# -- staging left by writers that died ---------------------------------------------------------


def _dead_pid() -> int:
    import subprocess

    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _staging(root: Path, rel: str, *, directory: bool = False, age: float = 0) -> Path:
    import time

    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    if directory:
        (path / "deep").mkdir(parents=True)
        (path / "deep" / "file").write_bytes(b"partial")
    else:
        path.write_bytes(b"partial")
    when = time.time() - age
    os.utime(path, (when, when))
    return path


def test_gc_removes_staging_of_dead_writers_and_spares_live_ones(tmp_path: Path) -> None:
    import time

    store = Store(tmp_path).init()
    dead, live, hour = _dead_pid(), os.getpid(), 3600.0
    stale = [
        _staging(tmp_path, f"blobs/{'a' * 64}.tmp-{dead}", directory=True, age=2 * hour),  # a blob-set flatten
        _staging(tmp_path, f"blobs/{'9' * 64}-x86_64.tmp-{dead}", directory=True, age=2 * hour),  # a blob set taken
        _staging(tmp_path, f"blobs/sha256/.tmp-{dead}-abcd_123", age=2 * hour),  # Store.put
        _staging(tmp_path, "blobs/sha256/.tmp-k2j4h5g6", age=2 * hour),  # Store.put before PIDs: age only
        _staging(tmp_path, f".index.json.tmp-{dead}-zzzzzzzz", age=2 * hour),  # atomic_file
        _staging(tmp_path, f"out/hello/.tmp-{'c' * 32}-{dead}", directory=True, age=2 * hour),  # an EIF build
        _staging(tmp_path, f"out/hello/.latest-{dead}", age=2 * hour),
        _staging(tmp_path, f"out/hello/{'d' * 32}/.policy.json.tmp-{dead}-qqqqqqqq", age=2 * hour),
        _staging(tmp_path, "odyn-build/odyn-build-x1y2z3w4", directory=True, age=2 * hour),
        # a live PID that started after the staging last changed: its writer's PID was reused
        _staging(tmp_path, f"blobs/{'b' * 64}.tmp-{live}", directory=True, age=10 * 24 * hour),
    ]
    kept = [
        _staging(tmp_path, f"blobs/{'e' * 64}.tmp-{live}", directory=True),  # being flattened right now
        _staging(tmp_path, f"blobs/sha256/.tmp-{live}-abcdefgh"),  # a put in flight
        _staging(tmp_path, f"blobs/sha256/.tmp-{dead}-fresh123", age=60),  # dead but young: another namespace?
        _staging(tmp_path, f"out/hello/.tmp-{'f' * 32}-{live}", directory=True),
        _staging(tmp_path, "blobs/sha256/.not-staging", age=2 * hour),  # no writer of ours names files so
        _staging(tmp_path, f"elsewhere/.tmp-{dead}-abcdefgh", age=2 * hour),  # outside the cache's staging places
    ]
    layer = store.put_bytes(b"layer")  # reachable: kept
    removed_staging: list[Staging] = []
    store.gc(grace_seconds=int(hour), staging=removed_staging)
    assert sorted(str(e.path) for e in removed_staging) == sorted(str(p) for p in stale)
    assert not any(os.path.lexists(p) for p in stale)
    assert all(os.path.lexists(p) for p in kept)
    assert {e.pid for e in removed_staging} == {dead, live, None}
    assert store.gc(grace_seconds=0, now=time.time()) == (1, 5)  # the unreferenced blob, never the live staging
    assert not store.has(layer) and all(os.path.lexists(p) for p in kept[:2])


def test_cache_gc_lists_what_it_removed(tmp_path: Path) -> None:
    from enclaver_rules.cli.main import main

    store = Store(tmp_path).init()
    gone = _staging(tmp_path, f"blobs/{'a' * 64}.tmp-{_dead_pid()}", directory=True, age=7200)
    out, err = io.StringIO(), io.StringIO()
    assert main(["cache", "gc", "--cache-dir", str(store.root)], stdout=out, stderr=err) == 0
    assert "1 stale staging entry" in out.getvalue() and str(gone) in err.getvalue()
    out = io.StringIO()
    assert main(["cache", "gc", "--cache-dir", str(store.root), "--json"], stdout=out, stderr=io.StringIO()) == 0
    assert json.loads(out.getvalue())["staging"] == []


def test_verify_quarantines_what_it_finds_damaged(tmp_path: Path) -> None:
    store = Store(tmp_path).init()
    d = store.put_bytes(b"good")
    path = store.path(d)
    os.chmod(path, 0o644)
    path.write_bytes(b"evil")
    [problem] = store.verify()
    [moved] = store.quarantined()
    assert problem.path == str(path) and f"moved to {moved}" in problem.message
    assert moved.read_bytes() == b"evil" and not store.has(d)
    assert store.verify() == []
    store.put_bytes(b"good", d)
    assert store.read(d) == b"good"
