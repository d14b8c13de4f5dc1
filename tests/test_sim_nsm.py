"""The simulated NSM: AWS's nsm-check sequence, documents that verify against the simulator's root
(and are refused against AWS's), the CA's state directory, and the Unix socket odyn talks to."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import socket
import stat
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import given
from hypothesis import strategies as st

from enclaver_rules.attestation import cose, document, pcrs, roots, verify
from enclaver_rules.attestation import nsm_messages as m
from enclaver_rules.attestation.nsm_messages import ErrorCode, NsmError
from enclaver_rules.errors import InvalidInput, OperationFailed
from enclaver_rules.runtime import sim_nsm
from enclaver_rules.runtime.sim_nsm import CertificateAuthority, SimulatedNsm, default_state_dir, serve
from odyn.nsm import NsmClient, NsmSocket

T0 = 1_760_000_000.0  # 2025-10-09, a fixed clock
MEASUREMENTS = {"Measurements": {"HashAlgorithm": "Sha384 { ... }", "PCR0": "a0" * 48, "PCR1": "a1" * 48,
                                 "PCR2": "a2" * 48, "PCR8": "a8" * 48}}
ROLE = "arn:aws:iam::111122223333:role/enclave"
INSTANCE = "i-0123456789abcdef0"


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class Direct:
    """A channel straight into handle(): the client's bytes, the simulator's answer."""

    def __init__(self, nsm: SimulatedNsm) -> None:
        self.nsm = nsm

    def request(self, body: bytes) -> bytes:
        return self.nsm.handle(body)


@pytest.fixture
def measured() -> dict[int, bytes]:
    return pcrs.parse_measurements(MEASUREMENTS)


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.open(tmp_path / "state", now=datetime.fromtimestamp(T0 - 60, UTC))


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def nsm(ca: CertificateAuthority, measured: dict[int, bytes], clock: Clock) -> SimulatedNsm:
    return SimulatedNsm(ca, measured, instance_id=INSTANCE, clock=clock)


def _error(nsm: SimulatedNsm, request: object) -> str:
    return cbor2.loads(nsm.handle(cbor2.dumps(request)))["Error"]  # type: ignore[no-any-return]


def test_the_nsm_check_sequence(nsm: SimulatedNsm) -> None:
    """aws-nitro-enclaves-nsm-api nsm-test/src/bin/nsm-check.rs, step by step, through odyn's client."""
    client = NsmClient(Direct(nsm))
    description = client.describe_nsm()
    assert description.max_pcrs == 32 and description.module_id and description.digest == "SHA384"
    assert description.locked_pcrs == tuple(range(16))
    states = [client.describe_pcr(i) for i in range(32)]
    assert all(len(s.data) == 48 for s in states)
    assert [i for i, s in enumerate(states) if any(s.data)] == [0, 1, 2, 4, 8]  # no role: PCR3 zero
    assert [s.lock for s in states] == [True] * 16 + [False] * 16
    for i in range(16):
        with pytest.raises(NsmError) as e:
            client.lock_pcr(i)
        assert e.value.code is ErrorCode.READ_ONLY_INDEX
    for _ in range(10):
        for i in range(16, 32):
            value = client.extend_pcr(i, b"\x01\x02\x03")
            assert len(value) == 48 and any(value)
    for i in range(16, 32):
        client.lock_pcr(i)
    client.lock_pcrs(32)
    assert _error(nsm, {"LockPCRs": {"range": 33}}) == "InvalidIndex"  # the client refuses to send it
    for i in range(32):
        with pytest.raises(NsmError) as e:
            client.extend_pcr(i, b"\x01\x02\x03")
        assert e.value.code is ErrorCode.READ_ONLY_INDEX
    for i in range(32):
        state = client.describe_pcr(i)
        assert state.lock and (any(state.data) == (i in (0, 1, 2, 4, 8) or i >= 16))
    for data in (None, b"\x80" * 1024):
        assert client.attestation(data, data, data)
    randoms = [client.get_random() for _ in range(16)]
    assert len(set(randoms)) == 16 and all(len(r) == 256 for r in randoms)


def test_extend_is_sha384_of_old_and_data(nsm: SimulatedNsm) -> None:
    client = NsmClient(Direct(nsm))
    first = client.extend_pcr(20, b"abc")
    assert first == hashlib.sha384(bytes(48) + b"abc").digest()
    assert client.extend_pcr(20, b"d") == hashlib.sha384(first + b"d").digest() == client.describe_pcr(20).data


def test_lock_rules(nsm: SimulatedNsm) -> None:
    assert _error(nsm, {"ExtendPCR": {"index": 0, "data": b"x"}}) == "ReadOnlyIndex"
    assert _error(nsm, {"LockPCR": {"index": 15}}) == "ReadOnlyIndex"
    assert _error(nsm, {"DescribePCR": {"index": 32}}) == "InvalidIndex"
    client = NsmClient(Direct(nsm))
    client.lock_pcr(16)
    client.lock_pcr(16)  # again: locked stays locked
    assert _error(nsm, {"ExtendPCR": {"index": 16, "data": b"x"}}) == "ReadOnlyIndex"
    client.lock_pcrs(20)
    assert nsm.locked_pcrs == tuple(range(20))


def test_boot_registers(ca: CertificateAuthority, measured: dict[int, bytes]) -> None:
    nsm = SimulatedNsm(ca, measured, instance_id=INSTANCE, role_arn=ROLE)
    assert [nsm.pcr(i) for i in (0, 1, 2, 8)] == [measured[i] for i in (0, 1, 2, 8)]
    assert nsm.pcr(3) == pcrs.of_string(ROLE) and nsm.pcr(4) == pcrs.of_string(INSTANCE)
    assert re.fullmatch(r"i-0123456789abcdef0-enc[0-9a-f]{16}", nsm.module_id)


def _document(client: NsmClient, **fields: bytes | None) -> tuple[bytes, document.AttestationDocument]:
    raw = client.attestation(**fields)
    return raw, verify.decode(raw).document


def test_a_document_verifies_against_the_simulators_root_only(nsm: SimulatedNsm, ca: CertificateAuthority,
                                                              tmp_path: Path) -> None:
    path = tmp_path / "measurements.json"
    path.write_text(json.dumps(MEASUREMENTS))
    expected = pcrs.parse_measurements(json.loads(path.read_text()))
    raw = NsmClient(Direct(nsm)).attestation(nonce=b"fresh", user_data=b"hello")
    at = datetime.fromtimestamp(T0 + 1, UTC)
    report = verify.verify(raw, roots=[ca.root.certificate], at=at, expect_pcrs=expected, nonce=b"fresh",
                           user_data=b"hello", allow_debug=False)
    assert report.ok, report.failure
    refused = verify.verify(raw, roots=[roots.aws_root()], at=at)
    assert not refused.ok and refused.failure is not None and refused.failure.code == "E_ROOT"
    assert not verify.verify(raw, roots=[ca.root.certificate], at=at, nonce=b"stale").ok


def test_the_document_has_the_real_shape(nsm: SimulatedNsm, ca: CertificateAuthority) -> None:
    raw, doc = _document(NsmClient(Direct(nsm)), public_key=b"")
    assert raw.startswith(bytes.fromhex("84 44 a1013822 a0 59")) and raw[-98:-96] == b"\x58\x60"
    assert cose.decode_sign1(raw).payload[:1] == b"\xbf"  # the current, indefinite-length map
    assert doc.timestamp == int(T0 * 1000) and doc.module_id == nsm.module_id and doc.digest == "SHA384"
    assert list(doc.pcrs) == list(range(16))
    assert (doc.public_key, doc.user_data, doc.nonce) == (b"", None, None)
    root_der = ca.root.certificate.public_bytes(Encoding.DER)
    assert doc.cabundle[0] == root_der and len(doc.cabundle) == 3
    leaf = x509.load_der_x509_certificate(doc.certificate)
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc == timedelta(hours=3)
    names = [x509.load_der_x509_certificate(c).subject.rfc4514_string() for c in (*doc.cabundle, doc.certificate)]
    assert all("O=enclaver" in n and "Amazon" not in n for n in names), names
    assert "CN=sim.nitro-enclaves" in names[0]


def test_the_older_definite_map_on_request(ca: CertificateAuthority, measured: dict[int, bytes]) -> None:
    nsm = SimulatedNsm(ca, measured, clock=Clock(), indefinite=False)
    raw = NsmClient(Direct(nsm)).attestation()
    assert cose.decode_sign1(raw).payload[:1] == b"\xa9"
    assert verify.verify(raw, roots=[ca.root.certificate], at="document").ok


def test_debug_mode_zeroes_the_measured_pcrs(ca: CertificateAuthority, measured: dict[int, bytes]) -> None:
    nsm = SimulatedNsm(ca, measured, instance_id=INSTANCE, role_arn=ROLE, debug_mode=True, clock=Clock())
    raw, doc = _document(NsmClient(Direct(nsm)))
    assert all(doc.pcrs[i] == bytes(48) for i in (0, 1, 2, 8))
    assert doc.pcrs[3] == pcrs.of_string(ROLE) and doc.pcrs[4] == pcrs.of_string(INSTANCE)
    report = verify.verify(raw, roots=[ca.root.certificate], at="document")
    assert report.ok and report.debug
    assert not verify.verify(raw, roots=[ca.root.certificate], at="document", allow_debug=False).ok


def test_a_locked_user_pcr_is_in_the_document(nsm: SimulatedNsm) -> None:
    client = NsmClient(Direct(nsm))
    value = client.extend_pcr(16, b"app config digest")
    assert 16 not in _document(client)[1].pcrs  # unlocked: not attested
    client.lock_pcr(16)
    doc = _document(client)[1]
    assert list(doc.pcrs) == list(range(17)) and doc.pcrs[16] == value


def test_the_leaf_lives_three_hours_then_a_new_one(nsm: SimulatedNsm, ca: CertificateAuthority,
                                                   clock: Clock) -> None:
    client = NsmClient(Direct(nsm))
    first = _document(client)[1].certificate
    clock.t += 3600
    assert _document(client)[1].certificate == first  # reused, as AWS's is
    clock.t += 2 * 3600
    raw, doc = _document(client)
    assert doc.certificate != first
    assert verify.verify(raw, roots=[ca.root.certificate], at="document").ok
    clock.t += 2 * 86400  # past the instance CA's day
    raw, doc = _document(client)
    assert verify.verify(raw, roots=[ca.root.certificate], at="document").ok


# --- the CA's state directory --------------------------------------------------------------------


def test_keys_are_private_and_reused_while_each_boot_has_its_own_leaf(ca: CertificateAuthority,
                                                                       measured: dict[int, bytes]) -> None:
    state = ca.directory
    assert stat.S_IMODE(os.stat(state).st_mode) == 0o700
    for key in ("root.key", "intermediate.key"):
        assert stat.S_IMODE(os.stat(state / key).st_mode) == 0o600
    assert ca.root_path.read_bytes() == ca.root_pem
    again = CertificateAuthority.open(state, now=datetime.fromtimestamp(T0, UTC))
    assert again.fingerprint == ca.fingerprint
    docs = [_document(NsmClient(Direct(SimulatedNsm(c, measured, clock=Clock()))))[1] for c in (ca, again)]
    assert docs[0].certificate != docs[1].certificate and docs[0].module_id != docs[1].module_id
    assert docs[0].cabundle[:2] == docs[1].cabundle[:2]  # same root and intermediate
    assert docs[0].instance_id == docs[1].instance_id == "i-" + ca.fingerprint[:17]  # one host


def test_the_intermediate_is_renewed_near_its_end(ca: CertificateAuthority) -> None:
    old = ca.intermediate(datetime.fromtimestamp(T0, UTC)).certificate
    later = datetime.fromtimestamp(T0, UTC) + sim_nsm.INTERMEDIATE_LIFETIME - timedelta(days=1)
    renewed = CertificateAuthority.open(ca.directory, now=later)
    new = renewed.intermediate(later).certificate
    assert new.serial_number != old.serial_number and renewed.fingerprint == ca.fingerprint
    new.verify_directly_issued_by(ca.root.certificate)
    kept = x509.load_pem_x509_certificate((ca.directory / "intermediate.pem").read_bytes())
    assert kept == new


def test_a_readable_key_is_refused(ca: CertificateAuthority) -> None:
    os.chmod(ca.directory / "root.key", 0o640)
    with pytest.raises(InvalidInput, match=r"root\.key can be read by others.*chmod 600"):
        CertificateAuthority.open(ca.directory)


def test_a_directory_others_can_write_is_refused(ca: CertificateAuthority) -> None:
    os.chmod(ca.directory, 0o777)
    with pytest.raises(InvalidInput, match=r"writable by others.*chmod 700"):
        CertificateAuthority.open(ca.directory)


def test_someone_elses_directory_is_refused(ca: CertificateAuthority, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: os.stat(ca.directory).st_uid + 1)
    with pytest.raises(InvalidInput, match="belongs to uid"):
        CertificateAuthority.open(ca.directory)


def test_a_key_that_does_not_match_is_refused(ca: CertificateAuthority, tmp_path: Path) -> None:
    other = CertificateAuthority.open(tmp_path / "other")
    (ca.directory / "root.key").write_bytes((other.directory / "root.key").read_bytes())
    with pytest.raises(OperationFailed, match="is not the key of"):
        CertificateAuthority.open(ca.directory)


def test_default_state_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    assert default_state_dir({"ENC_SIM_STATE": "/s", "XDG_STATE_HOME": "/x"}) == Path("/s")
    assert default_state_dir({"XDG_STATE_HOME": "/x"}) == Path("/x/enclaver/sim-nsm")
    monkeypatch.setenv("HOME", "/home/u")
    assert default_state_dir({}) == Path("/home/u/.local/state/enclaver/sim-nsm")


def test_bad_boot_inputs(ca: CertificateAuthority, measured: dict[int, bytes]) -> None:
    with pytest.raises(InvalidInput, match="lack PCR0"):
        SimulatedNsm(ca, {1: measured[1], 2: measured[2]})
    with pytest.raises(InvalidInput, match="48 bytes"):
        SimulatedNsm(ca, {**measured, 0: b"\x01" * 32})
    with pytest.raises(InvalidInput, match="not an EC2 instance id"):
        SimulatedNsm(ca, measured, instance_id="host-1")


# --- hostile requests -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> SimulatedNsm:
    directory = tmp_path_factory.mktemp("sim-nsm") / "state"
    return SimulatedNsm(CertificateAuthority.open(directory), pcrs.parse_measurements(MEASUREMENTS))


REQUEST_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2, 40) | st.binary(max_size=40)
    | st.sampled_from(["DescribeNSM", "GetRandom", "DescribePCR", "LockPCRs", "Error"]),
    lambda inner: st.dictionaries(st.sampled_from(["DescribePCR", "ExtendPCR", "LockPCR", "LockPCRs", "Attestation",
                                                   "index", "data", "range", "user_data", "nonce", "public_key"]),
                                  inner, max_size=3),
    max_leaves=8)


@given(body=st.binary(max_size=200) | REQUEST_VALUES.map(cbor2.dumps))
def test_any_bytes_get_an_answer_never_an_exception(shared: SimulatedNsm, body: bytes) -> None:
    answer = shared.handle(body)
    assert len(answer) <= m.RESPONSE_MAX
    value = cbor2.loads(answer)
    assert isinstance(value, str | dict)


def test_a_bug_answers_internal_error(nsm: SimulatedNsm, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nsm, "_random", lambda n: 1 / 0)
    assert cbor2.loads(nsm.handle(m.encode_request(m.GetRandom()))) == {"Error": "InternalError"}


# --- the socket ----------------------------------------------------------------------------------------


@contextmanager
def served(nsm: SimulatedNsm, path: Path, **options: object) -> Iterator[None]:
    """serve() in a thread's own event loop, as the CLI runs it (asyncio.run: leftovers cancelled)."""
    ready, failed, control = threading.Event(), [], []

    async def main() -> None:
        try:
            server = await serve(nsm, path, **options)  # type: ignore[arg-type]
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            failed.append(e)
            ready.set()
            return
        stop = asyncio.Event()
        control.append((asyncio.get_running_loop(), stop))
        ready.set()
        await stop.wait()
        server.close()
        await server.wait_closed()

    thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    thread.start()
    ready.wait(10)
    if failed:
        thread.join(10)
        raise failed[0]
    try:
        yield
    finally:
        loop, stop = control[0]
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)


def test_the_socket_gives_what_handle_gives(nsm: SimulatedNsm, ca: CertificateAuthority, tmp_path: Path) -> None:
    path = tmp_path / "nsm.sock"
    with served(nsm, path):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        remote, direct = NsmSocket(str(path)), Direct(nsm)
        for request in (m.DescribeNsm(), m.DescribePcr(4), m.DescribePcr(31), m.ExtendPcr(3, b"x"), m.LockPcr(2)):
            body = m.encode_request(request)
            assert remote.request(body) == direct.request(body)
        client = NsmClient(remote)
        assert client.describe_nsm() == NsmClient(direct).describe_nsm()
        raw = client.attestation(nonce=b"over the socket")
        assert verify.verify(raw, roots=[ca.root.certificate], at="document", nonce=b"over the socket").ok


def test_the_socket_serves_clients_at_once(nsm: SimulatedNsm, ca: CertificateAuthority, tmp_path: Path) -> None:
    path, documents = tmp_path / "nsm.sock", []
    with served(nsm, path, mode=0o660):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o660

        def attest(i: int) -> None:
            documents.append(NsmClient(NsmSocket(str(path))).attestation(nonce=bytes([i])))

        threads = [threading.Thread(target=attest, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert len(documents) == 8
    assert all(verify.verify(d, roots=[ca.root.certificate], at="document").ok for d in documents)


def test_an_oversized_frame_is_answered_input_too_large(nsm: SimulatedNsm, tmp_path: Path) -> None:
    path = tmp_path / "nsm.sock"
    with served(nsm, path), socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(struct.pack(">I", 0x7FFFFFFF))
        (n,) = struct.unpack(">I", sock.recv(4, socket.MSG_WAITALL))
        assert cbor2.loads(sock.recv(n, socket.MSG_WAITALL)) == {"Error": "InputTooLarge"}


def test_a_stalled_client_is_dropped(nsm: SimulatedNsm, tmp_path: Path) -> None:
    path = tmp_path / "nsm.sock"
    with served(nsm, path, idle_timeout=0.2), socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(b"\x00\x00")  # half a length, then nothing
        assert sock.recv(1) == b""  # closed by the server


def test_socket_paths(nsm: SimulatedNsm, tmp_path: Path) -> None:
    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(stale))  # bound, never listening: what a dead simulator leaves
    with served(nsm, stale):
        assert NsmClient(NsmSocket(str(stale))).describe_nsm().max_pcrs == 32
        with pytest.raises(InvalidInput, match="already listens"), served(nsm, stale):
            pass
    regular = tmp_path / "file"
    regular.write_text("")
    with pytest.raises(InvalidInput, match="not a socket"), served(nsm, regular):
        pass


def test_odyns_attestation_api_over_the_simulated_nsm(nsm: SimulatedNsm, ca: CertificateAuthority,
                                                      tmp_path: Path) -> None:
    """What `odyn --nsm unix:PATH` wires up: the API's attester is an NsmClient on the simulator's socket."""
    from odyn.api import AttestationApi, AttestationRequest
    from odyn.nsm import open_nsm

    path = tmp_path / "nsm.sock"
    with served(nsm, path):
        client = open_nsm(f"unix:{path}")
        assert client is not None

        async def ask() -> bytes:
            return await AttestationApi(client).attest(AttestationRequest(nonce=b"n" * 32, user_data=b"app"))

        raw = asyncio.run(ask())
    report = verify.verify(raw, roots=[ca.root.certificate], at="document", nonce=b"n" * 32, user_data=b"app",
                           expect_pcrs=pcrs.parse_measurements(MEASUREMENTS))
    assert report.ok, report.failure
