"""Files out (issue 18 item 4): odyn copies `outputs:` directories out on vsock 17003 and the host side
mirrors them, never outside its directory; the frame decoder is total."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from enclaver_rules.link.files import (
    DATA,
    FILE,
    HEADER,
    MAX_DATA,
    FilesDecoder,
    FilesFrameError,
    Frame,
    check_name,
    data_frame,
    encode,
    file_frame,
)
from enclaver_rules.link.transport import UnixTransport
from enclaver_rules.ports import FILES_OUT_PORT
from enclaver_rules.runtime.files_out import FilesOut, Limits, Mirror, receive

ENCLAVE_CID = 16

APP = textwrap.dedent("""
    import os, sys, time
    out, control, outside = sys.argv[1:4]
    def wait(name):
        while not os.path.exists(os.path.join(control, name)):
            time.sleep(0.02)
    os.makedirs(os.path.join(out, "sub"))
    with open(os.path.join(out, "a.log"), "w") as f: f.write("one\\n")
    with open(os.path.join(out, "sub", "b.log"), "w") as f: f.write("b\\n")
    with open(os.path.join(out, "evil.log"), "w") as f: f.write("planted\\n")
    os.symlink(os.path.join(outside, "secret"), os.path.join(out, "secret.log"))
    os.symlink(outside, os.path.join(out, "linkdir"))
    wait("go2")
    with open(os.path.join(out, "a.log"), "a") as f: f.write("two\\n")
    os.rename(os.path.join(out, "a.log"), os.path.join(out, "a.log.1"))
    with open(os.path.join(out, "a.log"), "w") as f: f.write("fresh\\n")
    with open(os.path.join(out, "sub", "b.log"), "w") as f: f.write("B2\\n")  # truncated in place
    wait("go3")
    print("app done")
""")


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file() and not p.is_symlink()}


def test_files_out_end_to_end_with_odyn(tmp_path: Path) -> None:
    out, control, outside, host, conf = (tmp_path / d for d in ("enclave-out", "control", "outside", "host", "conf"))
    for d in (control, outside, conf):
        d.mkdir()
    (outside / "secret").write_text("SECRET\n")
    (conf / "enclaver.yaml").write_text(f"version: v1\nname: files\ntarget: files:enclave\nsources:\n  app: app:1\n"
                                        f"outputs:\n  - {out}\n")
    mirrored = host / str(out).strip("/")
    mirrored.mkdir(parents=True)
    (outside / "target").write_text("untouched\n")
    (mirrored / "evil.log").symlink_to(outside / "target")  # planted on the host side: must not be followed
    vsock = tmp_path / "vsock"
    vsock.mkdir()
    odyn = subprocess.Popen([sys.executable, "-m", "odyn", "--transport", f"unix:{vsock}", "--cid", str(ENCLAVE_CID),
                             "--no-bootstrap", "--config-dir", str(conf), "--linger", "1", "--no-console", "--",
                             sys.executable, "-c", APP, str(out), str(control), str(outside)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    notes: list[str] = []

    async def until(want: dict[str, bytes]) -> None:
        while {k: v for k, v in tree(mirrored).items() if k in want} != want:
            await asyncio.sleep(0.02)

    async def scenario() -> bool:
        files = FilesOut(UnixTransport(vsock, 2), ENCLAVE_CID, str(host), retry=0.02, note=notes.append)
        task = asyncio.create_task(files.serve())
        await asyncio.wait_for(until({"a.log": b"one\n", "sub/b.log": b"b\n"}), 30)
        (control / "go2").touch()
        await asyncio.wait_for(until({"a.log": b"fresh\n", "a.log.1": b"one\ntwo\n", "sub/b.log": b"B2\n"}), 30)
        (control / "go3").touch()
        return await asyncio.wait_for(task, 30)

    try:
        assert asyncio.run(scenario()) is True  # odyn's clean end-of-stream
        assert odyn.wait(30) == 0
    finally:
        if odyn.poll() is None:
            odyn.kill()
    assert (outside / "target").read_text() == "untouched\n"
    assert (mirrored / "evil.log").is_symlink()  # left alone, not written through
    assert any("evil.log" in note for note in notes)
    got = tree(host)
    assert all(b"SECRET" not in data for data in got.values())
    assert not any(name.endswith("secret.log") or "linkdir" in name for name in got)
    assert [p for p in host.rglob("*") if p.is_symlink()] == [mirrored / "evil.log"]


async def _serve_raw(directory: Path, payload: bytes) -> asyncio.AbstractServer:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(payload)
        await writer.drain()
        writer.write_eof()
        await reader.read()  # hold on until the receiver hangs up
        writer.close()

    return await UnixTransport(directory, ENCLAVE_CID).listen(FILES_OUT_PORT, handler)


def _raw(kind: int, name: bytes, offset: int, payload: bytes) -> bytes:
    return HEADER.pack(kind, len(name), offset, len(payload)) + name + payload


@pytest.mark.parametrize("name", [b"../../etc/x", b"/etc/x", b"a/../../x", b"a//b", b"./x", b"a\\..\\x", b"a\0b", b"\xff"])
def test_a_hostile_enclave_cannot_name_a_path_outside(tmp_path: Path, name: bytes) -> None:
    host, vsock = tmp_path / "deep" / "host", tmp_path / "vsock"
    vsock.mkdir()
    stream = _raw(FILE, b"ok", 0, b"i") + _raw(DATA, b"ok", 0, b"fine\n") + _raw(FILE, name, 0, b"i") + _raw(DATA, name, 0, b"pwn\n")
    notes: list[str] = []

    async def scenario() -> bool:
        server = await _serve_raw(vsock, stream)
        try:
            files = FilesOut(UnixTransport(vsock, 2), ENCLAVE_CID, str(host), retry=0.02, note=notes.append)
            return await asyncio.wait_for(files.serve(), 30)
        finally:
            server.close()

    before = {p for p in tmp_path.rglob("*")}
    assert asyncio.run(scenario()) is False
    assert any("broke the protocol" in note for note in notes)
    after = {p for p in tmp_path.rglob("*")} - before
    assert all(p == host / "ok" or p in host.parents or p == host or p.is_socket() for p in after), after
    assert (host / "ok").read_bytes() == b"fine\n"
    assert not any(b"pwn" in p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and not p.is_socket())


def _mirror(tmp_path: Path, **limits: int) -> tuple[Mirror, list[str]]:
    notes: list[str] = []
    return Mirror(str(tmp_path), Limits(**limits), note=notes.append), notes


def test_mirror_reconnect_skips_what_it_holds_and_restarts_on_truncation(tmp_path: Path) -> None:
    mirror, _ = _mirror(tmp_path)
    mirror.apply(Frame(FILE, "d/x", 6, b"id"))
    mirror.apply(Frame(DATA, "d/x", 0, b"abcdef"))
    mirror.apply(Frame(FILE, "d/x", 9, b"id"))  # a new connection: the same file, now longer
    mirror.apply(Frame(DATA, "d/x", 0, b"abcdefghi"))
    assert (tmp_path / "d/x").read_bytes() == b"abcdefghi"
    mirror.apply(Frame(FILE, "d/x", 2, b"id"))  # truncated in the enclave
    mirror.apply(Frame(DATA, "d/x", 0, b"XY"))
    assert (tmp_path / "d/x").read_bytes() == b"XY"
    mirror.apply(Frame(FILE, "d/x", 1, b"other"))  # replaced
    mirror.apply(Frame(DATA, "d/x", 0, b"Z"))
    assert (tmp_path / "d/x").read_bytes() == b"Z"


def test_mirror_limits_drop_with_one_note(tmp_path: Path) -> None:
    mirror, notes = _mirror(tmp_path, file_bytes=10, total_bytes=15, files=2)
    mirror.apply(Frame(FILE, "a", 0, b"1"))
    for offset in range(0, 20, 4):
        mirror.apply(Frame(DATA, "a", offset, b"aaaa"))
    mirror.apply(Frame(FILE, "b", 0, b"2"))
    mirror.apply(Frame(DATA, "b", 0, b"bbbbbbbbbb"))
    mirror.apply(Frame(FILE, "c", 0, b"3"))
    mirror.apply(Frame(DATA, "c", 0, b"c"))
    assert (tmp_path / "a").read_bytes() == b"a" * 10
    assert (tmp_path / "b").read_bytes() == b"b" * 5
    assert not (tmp_path / "c").exists()
    assert len(notes) == 3


def test_mirror_never_writes_through_a_symlinked_directory(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "var").symlink_to(outside)
    mirror, notes = _mirror(root)
    mirror.apply(Frame(FILE, "var/x", 1, b"i"))
    mirror.apply(Frame(DATA, "var/x", 0, b"x"))
    assert list(outside.iterdir()) == [] and notes


def test_mirror_prefixes(tmp_path: Path) -> None:
    mirror, _ = _mirror(tmp_path)
    mirror.prefixes = ("var/log/app",)
    mirror.apply(Frame(FILE, "var/log/application", 1, b"i"))
    mirror.apply(Frame(DATA, "var/log/application", 0, b"x"))
    mirror.apply(Frame(FILE, "var/log/app/y", 1, b"i"))
    mirror.apply(Frame(DATA, "var/log/app/y", 0, b"y"))
    assert tree(tmp_path) == {"var/log/app/y": b"y"}


def test_data_before_its_file_frame_is_a_protocol_error(tmp_path: Path) -> None:
    mirror, _ = _mirror(tmp_path)

    async def scenario() -> None:
        reader = asyncio.StreamReader()
        reader.feed_data(data_frame("x", 0, b"1"))
        reader.feed_eof()
        await receive(reader, mirror)

    with pytest.raises(FilesFrameError):
        asyncio.run(scenario())


def test_encode_refuses_what_the_host_would_refuse() -> None:
    for bad in ("", "/abs", "a/../b", "a/", "x\0", "a" * 256):
        with pytest.raises(FilesFrameError):
            file_frame(bad, b"i", 0)
    with pytest.raises(FilesFrameError):
        data_frame("ok", 0, b"x" * (MAX_DATA + 1))
    with pytest.raises(FilesFrameError):
        file_frame("ok", b"i" * 33, 0)
    assert check_name("var/log/app/x.log") == "var/log/app/x.log"


names = st.lists(st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="/\0\\"), min_size=1, max_size=20)
                 .filter(lambda p: p not in (".", "..")), min_size=1, max_size=4).map("/".join)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([FILE, DATA]), names, st.integers(0, 1 << 40), st.binary(max_size=32)), max_size=5),
       st.integers(1, 64))
def test_frames_round_trip_in_any_split(frames: list[tuple[int, str, int, bytes]], step: int) -> None:
    wanted = [Frame(*f) for f in frames]
    stream = b"".join(encode(f) for f in wanted)
    decoder = FilesDecoder()
    got = []
    for i in range(0, len(stream), step):
        got += decoder.feed(stream[i:i + step])
    assert got == wanted and decoder.at_boundary()


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=300), st.integers(1, 50))
def test_decoder_is_total_on_any_bytes(data: bytes, step: int) -> None:
    decoder = FilesDecoder()
    try:
        for i in range(0, len(data), step):
            for frame in decoder.feed(data[i:i + step]):
                assert frame.kind in (FILE, DATA)
                assert check_name(frame.name) == frame.name
                assert not frame.name.startswith("/") and ".." not in frame.name.split("/")
    except FilesFrameError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=1, max_size=40))
def test_decoder_is_total_on_headers_with_any_name(name: bytes) -> None:
    decoder = FilesDecoder()
    try:
        frames = decoder.feed(_raw(DATA, name, 0, b"x"))
    except FilesFrameError:
        return
    assert len(frames) == 1 and "/" + frames[0].name == os.path.normpath("/" + frames[0].name)
