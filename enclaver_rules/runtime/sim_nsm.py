"""The simulated Nitro Secure Module: the NSM API answered on the host, documents signed by a local CA.

Three parts, one job each:

* `CertificateAuthority`: a root (30 years) and an intermediate kept in a state directory
  (`default_state_dir`), made on first use. P-384 keys, written 0600 through a temp file, fsync and
  rename, in a 0700 directory; certificates as PEM. A directory whose key files others could read,
  or that someone else owns, is refused. Subjects are shaped like AWS's but say they are simulated
  (``O=enclaver, OU=simulated``, never ``O=Amazon``), so a document from here fails against AWS's
  root, as it must.
* `SimulatedNsm`: one enclave boot. 32 SHA-384 registers (PCR0/1/2/8 from the EIF's measurements,
  PCR3 the role ARN's, PCR4 the instance id's; zero in debug mode for 0/1/2/8, as the real NSM does),
  the lock rules of AWS's on-hardware test (0..15 locked at boot), and per boot an instance CA and a
  3-hour leaf that live only in memory. `handle(bytes) -> bytes` is the whole API: hostile input
  gets an Error answer, never an exception.
* `serve(nsm, path)`: the API on a Unix socket (frames: a 4-byte big-endian length, then the bytes
  the ioctl would carry; one exchange per connection). The server holds the keys; a client (odyn in
  the simulator's container) only ever gets documents.

Where the NSM's behaviour is not documented, the choice is said where it is made (`_answer`).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import logging
import os
import re
import secrets
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from enclaver_rules.attestation import chain, cose, document, pcrs
from enclaver_rules.attestation import nsm_messages as msg
from enclaver_rules.attestation.chain import Authority
from enclaver_rules.attestation.nsm_messages import ErrorCode, NsmError
from enclaver_rules.errors import InvalidInput, OperationFailed
from enclaver_rules.oci.store import atomic_file
from enclaver_rules.private_state import prepare_dir, read_private

log = logging.getLogger("enclaver.sim-nsm")

STATE_ENV = "ENC_SIM_STATE"
ROOT_NAME = "sim.nitro-enclaves"  # AWS's is aws.nitro-enclaves; O and OU say "enclaver", "simulated"
ROOT_LIFETIME = timedelta(days=30 * 365)
INTERMEDIATE_LIFETIME = timedelta(days=90)
INTERMEDIATE_RENEW = timedelta(days=7)  # re-issued when less than this is left
INSTANCE_LIFETIME = timedelta(days=1)  # AWS's instance CA lives a day
LEAF_LIFETIME = timedelta(hours=3)  # as AWS's
LEAF_RENEW = timedelta(minutes=5)  # a new leaf when less is left: a verifier checks a little after the document
REGION = "local"
BOOT_LOCKED = frozenset(range(16))  # PCRs 0..15, locked at boot and read-only for the enclave
MEASURED = (0, 1, 2, 8)  # what the EIF's measurements give; debug mode zeroes these
RANDOM_SIZE = 256
MAX_STATE_FILE = 64 * 1024
IDLE_TIMEOUT = 30.0  # seconds for a client to send its request
FRAME = struct.Struct(">I")
_INSTANCE_ID = re.compile(r"^i-[0-9a-f]{8}([0-9a-f]{9})?$")
_FILES = {"root": ("root.pem", "root.key"), "intermediate": ("intermediate.pem", "intermediate.key")}


def default_state_dir(env: Mapping[str, str] | None = None) -> Path:
    """$ENC_SIM_STATE, else $XDG_STATE_HOME/enclaver/sim-nsm, else ~/.local/state/enclaver/sim-nsm."""
    env = os.environ if env is None else env
    if env.get(STATE_ENV):
        return Path(env[STATE_ENV])
    base = Path(env["XDG_STATE_HOME"]) if env.get("XDG_STATE_HOME") else Path.home() / ".local" / "state"
    return base / "enclaver" / "sim-nsm"


def _utc(t: float) -> datetime:
    return datetime.fromtimestamp(t, UTC)


# --- the CA in its state directory ------------------------------------------------------------------


class CertificateAuthority:
    """The simulator's root and intermediate, loaded from (or first made in) `directory`. Thread-safe."""

    def __init__(self, directory: Path, root: Authority, intermediate: Authority, *, created: bool = False) -> None:
        self.directory = directory
        self.root = root
        self.created = created  # the root was made by this `open`
        self._intermediate = intermediate
        self._lock = threading.Lock()

    @classmethod
    def open(cls, directory: Path | None = None, *, now: datetime | None = None) -> CertificateAuthority:
        """The CA in `directory` (default: `default_state_dir()`), made there if missing; an
        intermediate near its end is re-issued. InvalidInput for a directory others could tamper with."""
        directory = Path(directory) if directory is not None else default_state_dir()
        now = now or datetime.now(UTC)
        _prepare(directory)
        with _locked(directory):
            root = _load(directory, "root")
            created = root is None
            if root is None:
                root = chain.new_root(ROOT_NAME, now, ROOT_LIFETIME)
                _store(directory, "root", root)
                log.info("made the simulator's root CA in %s", directory)
            if root.certificate.not_valid_after_utc <= now + INTERMEDIATE_LIFETIME:
                raise OperationFailed(f"{directory}: the simulator's root expires "
                                      f"{root.certificate.not_valid_after_utc:%Y-%m-%d}",
                                      fix=f"remove {directory} to make a new CA (verifiers must then trust the new "
                                          f"root: `enclaver attestation ca --print-root`)")
            ca = cls(directory, root, _load(directory, "intermediate", issuer=root) or _issue(directory, root, now),
                     created=created)
        ca.intermediate(now)  # renewed if near its end
        return ca

    @property
    def root_pem(self) -> bytes:
        return self.root.certificate.public_bytes(serialization.Encoding.PEM)

    @property
    def root_path(self) -> Path:
        return self.directory / _FILES["root"][0]

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the root's DER, lowercase hex (how AWS's root is pinned)."""
        return hashlib.sha256(self.root.certificate.public_bytes(serialization.Encoding.DER)).hexdigest()

    def intermediate(self, now: datetime) -> Authority:
        """The intermediate, re-issued (and kept) when less than INTERMEDIATE_RENEW of it is left, or
        when it is not valid yet at `now` (a clock set back)."""
        with self._lock:
            cert = self._intermediate.certificate
            if cert.not_valid_after_utc - now < INTERMEDIATE_RENEW or now < cert.not_valid_before_utc:
                with _locked(self.directory):
                    self._intermediate = _issue(self.directory, self.root, now)
            return self._intermediate


def _issue(directory: Path, root: Authority, now: datetime) -> Authority:
    label = hashlib.sha256(os.urandom(16)).hexdigest()[:16]
    lifetime = min(INTERMEDIATE_LIFETIME, root.certificate.not_valid_after_utc - now)
    intermediate = chain.new_intermediate(root, f"{label}.{REGION}.{ROOT_NAME}", now, lifetime, path_length=1)
    _store(directory, "intermediate", intermediate)
    log.info("issued a new intermediate CA in %s", directory)
    return intermediate


def _prepare(directory: Path) -> None:
    prepare_dir(directory, what="the simulator's state directory", field="--state", private=False,
                fix_other="pass --state DIR (or set ENC_SIM_STATE) to a directory of its own")


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """One process at a time makes or renews the CA (two first starts must not make two roots)."""
    fd = os.open(directory / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _read_private(path: Path) -> bytes:
    """A key file, refused unless it is a regular file of ours that nobody else can read."""
    data = read_private(path, MAX_STATE_FILE, field="--state",
                        fix_exposed="and treat the key as exposed: remove the directory to make a new CA")
    return data[:MAX_STATE_FILE]


def _load(directory: Path, which: str, issuer: Authority | None = None) -> Authority | None:
    """The kept CA `which`, or None when it has not been made (its certificate, written last, is
    missing) or, for the intermediate, was issued by another root."""
    cert_name, key_name = _FILES[which]
    cert_path, key_path = directory / cert_name, directory / key_name
    if not cert_path.exists():
        return None
    try:
        key_pem = _read_private(key_path)
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes()[:MAX_STATE_FILE])
        key = serialization.load_pem_private_key(key_pem, password=None)
    except FileNotFoundError as e:
        raise OperationFailed(f"{e.filename} is missing beside {cert_path}",
                              fix=f"remove {directory} to make a new CA") from None
    except ValueError as e:
        raise OperationFailed(f"{directory}: the simulator's {which} CA is unreadable ({e})",
                              fix=f"remove {directory} to make a new CA") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        raise OperationFailed(f"{key_path} is not the key of {cert_path}", fix=f"remove {directory} to make a new CA")
    if issuer is not None:
        try:
            cert.verify_directly_issued_by(issuer.certificate)
        except (ValueError, TypeError, InvalidSignature):  # another root's: issue a new one
            return None
    return Authority(cert, key)


def _store(directory: Path, which: str, authority: Authority) -> None:
    """Key first (0600), certificate last: a certificate on disk means its key is there."""
    cert_name, key_name = _FILES[which]
    key = authority.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())
    with atomic_file(directory / key_name, mode=0o600) as f:
        f.write(key)
    with atomic_file(directory / cert_name, mode=0o644) as f:
        f.write(authority.certificate.public_bytes(serialization.Encoding.PEM))


# --- one boot of the simulated NSM ------------------------------------------------------------------


def boot_registers(measurements: Mapping[int, bytes], *, instance_id: str, role_arn: str | None,
                   debug_mode: bool) -> list[bytes]:
    """The 32 registers at boot: PCR0/1/2/8 measured (zero in debug mode), PCR3 the role, PCR4 the instance."""
    missing = [f"PCR{i}" for i in (0, 1, 2) if i not in measurements]
    if missing:
        raise InvalidInput(f"the measurements lack {', '.join(missing)}", field="Measurements",
                           fix="pass the measurements.json of the EIF the enclave runs")
    registers = [pcrs.ZERO] * msg.PCR_COUNT
    for i in MEASURED:
        value = measurements.get(i)
        if value is not None and len(value) != pcrs.SIZE:
            raise InvalidInput(f"PCR{i} is {len(value)} bytes; the NSM's registers are SHA-384 (48 bytes)",
                               field=f"Measurements.PCR{i}")
        if value is not None and not debug_mode:
            registers[i] = value
    registers[3] = pcrs.of_string(role_arn) if role_arn else pcrs.ZERO
    registers[4] = pcrs.of_string(instance_id)
    return registers


class SimulatedNsm:
    """One enclave's NSM from boot to shutdown. Thread-safe; `handle` never raises."""

    def __init__(self, ca: CertificateAuthority, measurements: Mapping[int, bytes], *,
                 instance_id: str | None = None, role_arn: str | None = None, debug_mode: bool = False,
                 clock: Callable[[], float] = time.time, random: Callable[[int], bytes] = os.urandom,
                 indefinite: bool = True) -> None:
        if instance_id is None:  # stable per CA, as an instance is per host
            instance_id = "i-" + ca.fingerprint[:17]
        if not _INSTANCE_ID.match(instance_id):
            raise InvalidInput(f"{instance_id!r} is not an EC2 instance id", field="instance-id",
                               fix="i- then 8 or 17 lowercase hex digits, e.g. i-0123456789abcdef0")
        self.ca = ca
        self.instance_id = instance_id
        self.module_id = f"{instance_id}-enc{secrets.token_hex(8)}"
        self.debug_mode = debug_mode
        self._registers = boot_registers(measurements, instance_id=instance_id, role_arn=role_arn,
                                         debug_mode=debug_mode)
        self._locked = set(BOOT_LOCKED)
        self._clock = clock
        self._random = random
        self._indefinite = indefinite
        self._instance: Authority | None = None
        self._leaf: Authority | None = None
        self._lock = threading.Lock()

    def pcr(self, index: int) -> bytes:
        with self._lock:
            return self._registers[index]

    @property
    def locked_pcrs(self) -> tuple[int, ...]:
        with self._lock:
            return tuple(sorted(self._locked))

    def handle(self, request: bytes) -> bytes:
        """One request's bytes → its answer's bytes: a result or {"Error": code}, never an exception."""
        try:
            answer = self._answer(msg.decode_request(request))
        except NsmError as e:
            answer = msg.ErrorResponse(e.code or ErrorCode.INVALID_ARGUMENT)
        except Exception:  # a bug here must not kill the server: the client gets InternalError, the log a trace
            log.exception("the simulated NSM failed on a request")
            answer = msg.ErrorResponse(ErrorCode.INTERNAL_ERROR)
        return msg.encode_response(answer)

    def _answer(self, request: msg.Request) -> msg.Response:
        """The semantics of AWS's nsm-check (reference §3.2). Undocumented choices, made here:
        extending a locked PCR and LockPCR on 0..15 answer ReadOnlyIndex (the API's "PCR is in
        read-only mode"); LockPCR on an already locked PCR ≥ 16 succeeds, as LockPCRs over locked
        PCRs does on hardware."""
        with self._lock:
            match request:
                case msg.DescribeNsm():
                    return msg.NsmDescription(self.module_id, msg.PCR_COUNT, tuple(sorted(self._locked)), "SHA384")
                case msg.DescribePcr(index):
                    return msg.PcrState(index in self._locked, self._registers[index])
                case msg.ExtendPcr(index, data):
                    if index in self._locked:
                        raise NsmError(f"PCR{index} is locked", code=ErrorCode.READ_ONLY_INDEX)
                    self._registers[index] = pcrs.extend(self._registers[index], data)
                    return msg.ExtendedPcr(self._registers[index])
                case msg.LockPcr(index):
                    if index in BOOT_LOCKED:
                        raise NsmError(f"PCR{index} is read-only", code=ErrorCode.READ_ONLY_INDEX)
                    self._locked.add(index)
                    return msg.PcrLocked()
                case msg.LockPcrs(count):
                    self._locked.update(range(count))  # count ≤ 32: the decoder answered InvalidIndex otherwise
                    return msg.PcrsLocked()
                case msg.Attestation(user_data, nonce, public_key):
                    return msg.AttestationDocument(self._document(user_data, nonce, public_key))
                case msg.GetRandom():
                    return msg.RandomBytes(self._random(RANDOM_SIZE))
        raise NsmError(f"unknown request {request!r:.60}", code=ErrorCode.INVALID_ARGUMENT)  # pragma: no cover

    def _document(self, user_data: bytes | None, nonce: bytes | None, public_key: bytes | None) -> bytes:
        timestamp = int(self._clock() * 1000)
        now = _utc(timestamp / 1000)
        leaf, bundle = self._signer(now)
        doc = document.AttestationDocument(
            module_id=self.module_id, digest="SHA384", timestamp=timestamp,
            pcrs={i: self._registers[i] for i in sorted(self._locked)},
            certificate=leaf.certificate.public_bytes(serialization.Encoding.DER), cabundle=bundle,
            public_key=public_key, user_data=user_data, nonce=nonce)
        return cose.sign1(document.encode_payload(doc, indefinite=self._indefinite), leaf.key)

    def _signer(self, now: datetime) -> tuple[Authority, tuple[bytes, ...]]:
        """This boot's leaf and the cabundle above it (root first), issued again when the leaf would
        not be valid at `now` (or only for LEAF_RENEW more)."""
        intermediate = self.ca.intermediate(now)
        if not _valid(self._instance, now, LEAF_LIFETIME) or not _issued_by(self._instance, intermediate):
            self._instance = chain.new_intermediate(intermediate, f"{self.instance_id}.{REGION}.{ROOT_NAME}", now,
                                                    INSTANCE_LIFETIME, path_length=0)
            self._leaf = None
        assert self._instance is not None
        if not _valid(self._leaf, now, LEAF_RENEW):
            self._leaf = chain.new_leaf(self._instance, f"{self.module_id}.{REGION}.sim", now, LEAF_LIFETIME)
        assert self._leaf is not None
        bundle = tuple(a.certificate.public_bytes(serialization.Encoding.DER)
                       for a in (self.ca.root, intermediate, self._instance))
        return self._leaf, bundle


def _valid(authority: Authority | None, now: datetime, margin: timedelta) -> bool:
    if authority is None:
        return False
    cert = authority.certificate
    return cert.not_valid_before_utc <= now and now + margin < cert.not_valid_after_utc


def _issued_by(authority: Authority | None, issuer: Authority) -> bool:
    return authority is not None and authority.certificate.issuer == issuer.certificate.subject


# --- the Unix socket ------------------------------------------------------------------------------


async def serve(nsm: SimulatedNsm, path: str | os.PathLike[str], *, mode: int = 0o600,
                idle_timeout: float = IDLE_TIMEOUT) -> asyncio.Server:
    """Listen on the Unix socket `path` (mode 0600, or 0660 for a group) and answer each connection's
    one request. A stale socket file is replaced; a live one or any other file is refused."""
    path = os.fspath(path)
    _clear(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, mode)  # before listen: nobody connects while the mode is the umask's
        sock.listen(64)
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        raise OperationFailed(f"{path}: cannot listen: {e.strerror or e}") from None

    async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            answer = await asyncio.wait_for(_request(reader, nsm), idle_timeout)
            writer.write(FRAME.pack(len(answer)) + answer)
            await asyncio.wait_for(writer.drain(), idle_timeout)
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass  # the client went away or stalled: nothing to answer
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    return await asyncio.start_unix_server(exchange, sock=sock)


async def _request(reader: asyncio.StreamReader, nsm: SimulatedNsm) -> bytes:
    (length,) = FRAME.unpack(await reader.readexactly(FRAME.size))
    if length > msg.REQUEST_MAX:  # what the driver says with EMSGSIZE; the body is never read
        return msg.encode_error(ErrorCode.INPUT_TOO_LARGE)
    body = await reader.readexactly(length)
    return await asyncio.to_thread(nsm.handle, body)  # signing takes milliseconds: keep the loop free


def _clear(path: str) -> None:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise InvalidInput(f"{path} exists and is not a socket", fix="pass --socket a path that is free")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)  # left by a simulator that died
        return
    finally:
        probe.close()
    raise InvalidInput(f"a simulated NSM already listens at {path}", fix="stop it, or pass another --socket")
