"""The nitro-cli adapter on a Nitro host: run-enclave, describe-enclaves, terminate-enclave.

Pure parts (argument lists, JSON parsing, error classification) and one thin I/O part (`NitroCli`,
which runs the commands through an injectable `Runner`). The contract, from aws/aws-nitro-enclaves-cli
1.5.0 (commit 2950b36) and the compat notes (§4, "Host side: enclaver-run"):

* flags (`src/lib.rs`, `create_app`): ``run-enclave --cpu-count N --memory M --eif-path P
  [--debug-mode] [--enclave-cid C] [--enclave-name NAME]``; ``describe-enclaves``;
  ``terminate-enclave --enclave-id ID``. `--memory` is MiB. `--attach-console` is never passed (it
  blocks on the console; upstream enclaver runs `console` separately in debug mode).
* stdout is `serde_json::to_string_pretty` of `EnclaveRunInfo` / a list of `EnclaveDescribeInfo` /
  `EnclaveTerminateInfo` (`src/common/json_output.rs`); progress ("Start allocating memory...",
  "Started enclave with ...") goes to stderr (`safe_conn_eprintln`, `src/enclave_proc/resource_manager.rs`).
* on failure stderr carries one block per error: ``[ E29 ] <text>`` … ``If you open a support ticket,
  please provide the error log found at "<path>"`` (`src/common/mod.rs`, `construct_error_message`);
  the log is ``$NITRO_CLI_LOGS_PATH`` or ``/var/log/nitro_enclaves`` + ``/err<RFC 3339 time>.log``
  (`src/common/logger.rs`). The exit code is the *last* error's number (`ok_or_exit_with_errno`): a
  failed run-enclave prints the root error (say E29), then ``Failed connections: 1`` and E39, and
  exits 39. So the root cause is the first ``[ Exx ]`` on stderr, never the exit code.
* E29 ("Ioctl failure") right after a previous enclave ended is transient: aws/aws-nitro-enclaves-cli
  issue 433 ("The issue solves itself by retrying"). `run_enclave` retries it a bounded number of
  times with exponential backoff, logging each retry.

Upstream enclaver (`enclaver/src/nitro_cli.rs`) logs stderr and the error log but fails with only
"failed to run enclave", and a log it cannot read aborts the report; here the error itself carries
the command, the exit code, the root error, nitro-cli's stderr and the log (bounded, and only from
nitro-cli's log directory), and a fix.
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard, cast

from enclaver_rules.errors import InvalidInput, OperationFailed

log = logging.getLogger("enclaver.nitro-cli")

EXECUTABLE = "nitro-cli"
LOG_DIR = "/var/log/nitro_enclaves"  # src/common/logger.rs LOGS_DIR_PATH
LOG_DIR_ENV = "NITRO_CLI_LOGS_PATH"
ERRORS_URL = "https://docs.aws.amazon.com/enclaves/latest/user/cli-errors.html"
MIN_CPUS = 1  # upstream enclaver's checks and messages (compat notes §1 "Validation upstream actually does")
MIN_MEMORY_MIB = 64
MAX_OUTPUT = 1 << 20  # stdout/stderr kept; nitro-cli's JSON is a few hundred bytes per enclave
MAX_LOG = 64 << 10  # of each error log, its tail
MAX_STDERR_SHOWN = 4096
TIMEOUTS = {"run-enclave": 600.0, "describe-enclaves": 60.0, "terminate-enclave": 120.0}
E29_RETRIES = 3
E29_BACKOFF = 2.0  # seconds before the first retry; doubled each time
STATES = ("RUNNING", "TERMINATING", "EMPTY")  # EnclaveState's Display, src/enclave_proc/resource_manager.rs
_CODE = re.compile(r"^\[ (E\d{2}) \] ?(.*)$", re.M)
_LOG_LINE = re.compile(r'please provide the error log found at "([^"\n]{1,4096})"')
_ENCLAVE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")  # i-<instance>-enc<slot uid hex>
_NAME = re.compile(r"[^\x00-\x1f\x7f]{1,256}")
_U32 = (1 << 32) - 1


@dataclass(frozen=True, slots=True)
class Completed:
    """What a finished command gave: its argv, exit code and output (bytes, as read)."""

    argv: tuple[str, ...]
    returncode: int
    stdout: bytes
    stderr: bytes


#: Runs argv with a timeout (seconds) and returns what it gave; raises OperationFailed when it cannot.
Runner = Callable[[Sequence[str], float], Completed]


def subprocess_runner(argv: Sequence[str], timeout: float) -> Completed:
    """The default `Runner`: the command with no stdin, its output captured, killed after `timeout`."""
    try:
        done = subprocess.run(list(argv), stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout, check=False)
    except FileNotFoundError:
        raise OperationFailed(f"{argv[0]} not found", fix=_MISSING_FIX) from None
    except subprocess.TimeoutExpired:
        raise OperationFailed(f"`{' '.join(argv)}` did not finish within {timeout:g} s and was killed",
                              fix="check the host's Nitro Enclaves driver and allocator "
                                  "(journalctl -u nitro-enclaves-allocator), then retry") from None
    except OSError as e:
        raise OperationFailed(f"cannot run {argv[0]}: {e.strerror or e}", fix=_MISSING_FIX) from None
    return Completed(tuple(argv), done.returncode, done.stdout[:MAX_OUTPUT], done.stderr[:MAX_OUTPUT])


_MISSING_FIX = ("install AWS's nitro-cli on the Nitro host (Amazon Linux: `dnf install aws-nitro-enclaves-cli`); "
                "in a container, build the release on a runtime image that carries it (README: the runtime image)")


# ---- arguments ------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class RunEnclaveArgs:
    """`nitro-cli run-enclave`'s inputs, checked when made (InvalidInput naming the flag)."""

    eif_path: str
    cpu_count: int
    memory_mib: int
    debug_mode: bool = False
    enclave_cid: int | None = None  # None: nitro-cli picks one (what upstream enclaver does)
    enclave_name: str | None = None

    def __post_init__(self) -> None:
        if not self.eif_path or self.eif_path.startswith("-") or "\x00" in self.eif_path:
            raise InvalidInput(f"EIF path {self.eif_path!r} cannot be passed to nitro-cli", field="eif",
                               fix="give the EIF's path (prefix ./ to a name that starts with '-')")
        if not _is_int(self.cpu_count) or self.cpu_count < MIN_CPUS:
            raise InvalidInput(f"at least 1 CPU is required, got: {self.cpu_count}", field="defaults.cpu_count",
                               fix="give --cpu-count 1 or more (defaults.cpu_count in enclaver.yaml)")
        if not _is_int(self.memory_mib) or self.memory_mib < MIN_MEMORY_MIB:
            raise InvalidInput(f"at least 64MiB of memory are required, got: {self.memory_mib}",
                               field="defaults.memory_mb",
                               fix="give --memory-mb 64 or more (defaults.memory_mb in enclaver.yaml)")
        if self.enclave_cid is not None and not (_is_int(self.enclave_cid) and 4 <= self.enclave_cid < _U32):
            # 0..2 are well known, 3 is the parent's, u32::MAX is ANY (src/common/commands_parser.rs parse_enclave_cid)
            raise InvalidInput(f"enclave CID {self.enclave_cid} cannot be used", field="--enclave-cid",
                               fix="give a CID from 4 to 4294967294, or none and let nitro-cli choose")
        if self.enclave_name is not None and not (_NAME.fullmatch(self.enclave_name)
                                                  and not self.enclave_name.startswith("-")):
            raise InvalidInput(f"enclave name {self.enclave_name!r} cannot be passed to nitro-cli",
                               field="--enclave-name", fix="use printable characters, not starting with '-'")

    def argv(self) -> list[str]:
        args = ["run-enclave", "--cpu-count", str(self.cpu_count), "--memory", str(self.memory_mib),
                "--eif-path", self.eif_path]
        if self.debug_mode:
            args.append("--debug-mode")
        if self.enclave_cid is not None:
            args += ["--enclave-cid", str(self.enclave_cid)]
        if self.enclave_name is not None:
            args += ["--enclave-name", self.enclave_name]
        return args


def describe_argv() -> list[str]:
    return ["describe-enclaves"]


def terminate_argv(enclave_id: str) -> list[str]:
    if not _ENCLAVE_ID.fullmatch(enclave_id):
        raise InvalidInput(f"enclave ID {enclave_id!r} is not one nitro-cli gives", field="--enclave-id",
                           fix="take the ID from `nitro-cli describe-enclaves`")
    return ["terminate-enclave", "--enclave-id", enclave_id]


# ---- output ---------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Enclave:
    """One enclave as run-enclave reports it, or (with `state`, `flags`) as describe-enclaves does."""

    name: str
    enclave_id: str
    process_id: int
    cid: int
    cpu_ids: tuple[int, ...]
    memory_mib: int
    state: str = "RUNNING"
    flags: str = ""

    @property
    def cpu_count(self) -> int:
        return len(self.cpu_ids)

    @property
    def debug_mode(self) -> bool:
        return self.flags == "DEBUG_MODE"


@dataclass(frozen=True, slots=True)
class Termination:
    enclave_id: str
    terminated: bool
    name: str = ""


def parse_run(stdout: bytes | str) -> Enclave:
    """run-enclave's stdout: one `EnclaveRunInfo` object."""
    return _enclave(_json(stdout, "run-enclave"), "run-enclave", describe=False)


def parse_describe(stdout: bytes | str) -> tuple[Enclave, ...]:
    """describe-enclaves' stdout: a list of `EnclaveDescribeInfo` objects (extra keys such as
    Measurements, ImageName and Metadata are ignored)."""
    data = _json(stdout, "describe-enclaves")
    if not isinstance(data, list):
        raise _bad_output("describe-enclaves", "a JSON list", data)
    return tuple(_enclave(item, "describe-enclaves", describe=True) for item in data)


def parse_terminate(stdout: bytes | str) -> Termination:
    """terminate-enclave's stdout: `{"EnclaveName"?, "EnclaveID", "Terminated"}`."""
    data = _json(stdout, "terminate-enclave")
    if not isinstance(data, dict):
        raise _bad_output("terminate-enclave", "a JSON object", data)
    enclave_id, terminated, name = data.get("EnclaveID"), data.get("Terminated"), data.get("EnclaveName", "")
    if not (isinstance(enclave_id, str) and _ENCLAVE_ID.fullmatch(enclave_id)) or not isinstance(terminated, bool):
        raise _bad_output("terminate-enclave", "EnclaveID (an ID) and Terminated (true or false)", data)
    if not isinstance(name, str) or (name and not _NAME.fullmatch(name)):
        raise _bad_output("terminate-enclave", "EnclaveName, a printable string", data)
    return Termination(enclave_id, terminated, name)


def _json(stdout: bytes | str, command: str) -> Any:
    if len(stdout) > MAX_OUTPUT:
        raise _bad_output(command, f"at most {MAX_OUTPUT} bytes", f"{len(stdout)} bytes")
    try:
        return json.loads(stdout, parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:
        raise _bad_output(command, "JSON", f"{e}: {_clip(stdout)}") from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _enclave(value: Any, command: str, *, describe: bool) -> Enclave:
    if not isinstance(value, dict):
        raise _bad_output(command, "a JSON object per enclave", value)
    item: dict[str, Any] = value
    name = item.get("EnclaveName", "" if describe else None)  # optional in describe-enclaves
    enclave_id, cpu_ids = item.get("EnclaveID"), item.get("CPUIDs")
    problems = []
    if not isinstance(name, str) or (name and not _NAME.fullmatch(name)):
        problems.append("EnclaveName is not a printable string")
    if not isinstance(enclave_id, str) or not _ENCLAVE_ID.fullmatch(enclave_id):
        problems.append("EnclaveID is not an enclave ID")
    pid, cid, cpus, memory = (item.get(k) for k in ("ProcessID", "EnclaveCID", "NumberOfCPUs", "MemoryMiB"))
    if not (_is_int(pid) and 0 < pid <= _U32):
        problems.append("ProcessID is not a process ID")
    if not (_is_int(cid) and 3 < cid < _U32):
        problems.append("EnclaveCID is not an enclave's vsock CID (4 to 4294967294)")
    if not (isinstance(cpu_ids, list) and cpu_ids and all(_is_int(c) and 0 <= c < 65536 for c in cpu_ids)
            and len(set(cpu_ids)) == len(cpu_ids)):
        problems.append("CPUIDs is not a list of distinct CPU numbers")
    elif not (_is_int(cpus) and cpus == len(cpu_ids)):
        problems.append("NumberOfCPUs does not count CPUIDs")
    if not (_is_int(memory) and 0 < memory < (1 << 40)):
        problems.append("MemoryMiB is not a size")
    state, flags = (item.get("State"), item.get("Flags")) if describe else ("RUNNING", "")
    if describe and state not in STATES:
        problems.append(f"State is not one of {', '.join(STATES)}")
    if describe and flags not in ("NONE", "DEBUG_MODE"):
        problems.append("Flags is not NONE or DEBUG_MODE")
    if problems:
        raise _bad_output(command, "; ".join(problems), item)
    return Enclave(cast(str, name), cast(str, enclave_id), cast(int, pid), cast(int, cid),
                   tuple(cast(list[int], cpu_ids)), cast(int, memory), str(state), str(flags))


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _bad_output(command: str, wanted: str, got: object) -> OperationFailed:
    return OperationFailed(f"nitro-cli {command} printed output enclaver cannot use ({wanted}): {_clip(got)}",
                           fix="check that `nitro-cli --version` is AWS's nitro-cli 1.2 or later")


def _clip(value: object, limit: int = 300) -> str:
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value if isinstance(value, str) \
        else json.dumps(value, default=str)[: limit + 1]
    return repr(text[:limit] + ("…" if len(text) > limit else ""))


# ---- failures -------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Failure:
    """What a failed nitro-cli printed: its error codes in order (the first is the root cause) with
    their first lines, and the error-log paths it named."""

    codes: tuple[tuple[str, str], ...]
    log_paths: tuple[str, ...]

    @property
    def root(self) -> str:
        return self.codes[0][0] if self.codes else ""


def parse_failure(stderr: bytes | str) -> Failure:
    text = stderr.decode("utf-8", "replace") if isinstance(stderr, bytes) else stderr
    text = text[:MAX_OUTPUT]
    codes = tuple((m.group(1), m.group(2).strip()[:300]) for m in _CODE.finditer(text))
    paths = tuple(dict.fromkeys(m.group(1) for m in _LOG_LINE.finditer(text)))
    return Failure(codes, paths)


#: The fix for a root error (codes from src/common/document_errors.rs). `{memory}`, `{cpus}` and
#: `{eif}` are the run's values when known.
FIXES = {
    "E19": "if the file is /dev/nitro_enclaves, enable Nitro Enclaves on the instance (EnclaveOptions) and load "
           "the nitro_enclaves driver; in a container pass --device /dev/nitro_enclaves and --privileged",
    "E21": "a CPU asked for is not in the allocator's pool: edit cpu_pool in /etc/nitro_enclaves/allocator.yaml "
           "and `systemctl restart nitro-enclaves-allocator`",
    "E22": "the allocator reserves fewer CPUs than the {cpus} asked: set cpu_count in "
           "/etc/nitro_enclaves/allocator.yaml and `systemctl restart nitro-enclaves-allocator`, or run with "
           "--configure-allocator; or ask for fewer with --cpu-count",
    "E26": "nitro-cli wants at least 4 × the EIF's size in memory: raise --memory-mb (defaults.memory_mb in "
           "enclaver.yaml) above {memory} MiB, to the minimum in nitro-cli's message",
    "E27": "the allocator reserves less memory than the {memory} MiB asked: set memory_mib in "
           "/etc/nitro_enclaves/allocator.yaml and `systemctl restart nitro-enclaves-allocator`, or run with "
           "--configure-allocator; enclaves running now use part of the reservation (nitro-cli describe-enclaves)",
    "E29": "an ioctl failed, typically while a previous enclave's memory is still being released "
           "(aws/aws-nitro-enclaves-cli issue 433); enclaver retried: wait and run again, or "
           "`systemctl restart nitro-enclaves-allocator` with no enclave running",
    "E35": "the allocator's hugepages may be gone: `systemctl restart nitro-enclaves-allocator` with no enclave "
           "running",
    "E36": "the enclave did not boot: an EIF built with the development blob set cannot boot (build with AWS's "
           "blobs); otherwise run with --debug-mode and read the console",
    "E44": "the console is only there in debug mode: run with --debug-mode",
}


def failure_error(completed: Completed, *, log_dirs: Sequence[str] | None = None, attempts: int = 1,
                  context: dict[str, object] | None = None) -> OperationFailed:
    """The error for a failed command: command, exit code, root error, stderr, the error log(s) and a fix."""
    failure = parse_failure(completed.stderr)
    command = completed.argv[1] if len(completed.argv) > 1 else completed.argv[0]
    root = failure.root
    what = f"{root} {failure.codes[0][1]}" if root else "no error code"
    tried = f" after {attempts} attempts" if attempts > 1 else ""
    parts = [f"nitro-cli {command} failed{tried} (exit code {completed.returncode}; {what})"]
    stderr = completed.stderr.decode("utf-8", "replace").strip()
    if stderr:
        parts.append("nitro-cli's stderr:\n" + _printable(stderr[-MAX_STDERR_SHOWN:]))
    dirs = default_log_dirs() if log_dirs is None else log_dirs
    for path in failure.log_paths:
        parts.append(f"nitro-cli's error log {path}:\n" + read_error_log(path, dirs))
    values = {"memory": "the", "cpus": "", "eif": ""} | {k: str(v) for k, v in (context or {}).items()}
    fix = FIXES.get(root, "see nitro-cli's error above" + (f" and {ERRORS_URL}#{root}" if root else ""))
    return OperationFailed("\n".join(parts), file=" ".join(completed.argv[:2]), fix=fix.format(**values))


def default_log_dirs(env: dict[str, str] | None = None) -> tuple[str, ...]:
    """Where nitro-cli writes its error logs: $NITRO_CLI_LOGS_PATH, else /var/log/nitro_enclaves."""
    env = dict(os.environ) if env is None else env
    return (env[LOG_DIR_ENV],) if env.get(LOG_DIR_ENV) else (LOG_DIR,)


def read_error_log(path: str, log_dirs: Sequence[str], limit: int = MAX_LOG) -> str:
    """The tail (`limit` bytes) of one of nitro-cli's `err*.log` files, never anything else: the path
    comes from a program's output, so it must be a regular file named err*.log directly in one of
    `log_dirs`, opened without following a link. A refusal or an unreadable file is said in the text."""
    p = Path(path)
    if not (p.name.startswith("err") and p.name.endswith(".log")) or not p.is_absolute():
        return f"(not read: {path!r} is not a nitro-cli error log)"
    try:
        parent = p.parent.resolve(strict=True)
        if not any(parent == Path(d).resolve() for d in log_dirs):
            return f"(not read: {path!r} is outside nitro-cli's log directory {', '.join(log_dirs)})"
        fd = os.open(parent / p.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        return f"(could not read it: {e.strerror or e})"
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            return "(not read: not a regular file)"
        skipped = max(0, info.st_size - limit)
        f.seek(skipped)
        data = f.read(limit)
    text = _printable(data.decode("utf-8", "replace")).rstrip()
    return (f"(first {skipped} bytes left out)\n" if skipped else "") + text


def _printable(text: str) -> str:
    """Control characters (an ANSI escape in a log, say) shown as escapes; newlines and tabs kept."""
    return "".join(c if c in "\n\t" or (c >= " " and c != "\x7f") else repr(c)[1:-1] for c in text)


# ---- the adapter ----------------------------------------------------------------------------------

class NitroCli:
    """nitro-cli through `runner` (subprocess by default). `sleep` is injected so tests never wait."""

    def __init__(self, runner: Runner = subprocess_runner, *, executable: str = EXECUTABLE,
                 timeouts: dict[str, float] | None = None, retries: int = E29_RETRIES,
                 backoff: float = E29_BACKOFF, sleep: Callable[[float], None] = time.sleep,
                 log_dirs: Sequence[str] | None = None) -> None:
        self.runner, self.executable, self.retries, self.backoff, self.sleep = runner, executable, retries, backoff, sleep
        self.timeouts = TIMEOUTS | (timeouts or {})
        self.log_dirs = log_dirs

    def _run(self, args: list[str]) -> Completed:
        return self.runner([self.executable, *args], self.timeouts[args[0]])

    def run_enclave(self, args: RunEnclaveArgs) -> Enclave:
        """Start the enclave; E29 is retried `retries` times, waiting backoff, 2×backoff, … between."""
        context = {"memory": args.memory_mib, "cpus": args.cpu_count, "eif": args.eif_path}
        for attempt in range(self.retries + 1):
            done = self._run(args.argv())
            if done.returncode == 0:
                return parse_run(done.stdout)
            failure = parse_failure(done.stderr)
            if failure.root != "E29" or attempt == self.retries:
                raise failure_error(done, log_dirs=self.log_dirs, attempts=attempt + 1, context=context)
            delay = self.backoff * 2 ** attempt
            log.warning("nitro-cli run-enclave failed with E29 (ioctl failure, usually transient: "
                        "aws/aws-nitro-enclaves-cli issue 433); retry %d of %d in %g s (error log: %s)",
                        attempt + 1, self.retries, delay, ", ".join(failure.log_paths) or "none")
            self.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    def describe_enclaves(self) -> tuple[Enclave, ...]:
        done = self._run(describe_argv())
        if done.returncode != 0:
            raise failure_error(done, log_dirs=self.log_dirs)
        return parse_describe(done.stdout)

    def terminate_enclave(self, enclave_id: str) -> Termination:
        """Stop the enclave; its answer must name it and say Terminated: true (as upstream requires)."""
        done = self._run(terminate_argv(enclave_id))
        if done.returncode != 0:
            raise failure_error(done, log_dirs=self.log_dirs)
        result = parse_terminate(done.stdout)
        if result.enclave_id != enclave_id or not result.terminated:
            raise OperationFailed(f"nitro-cli terminate-enclave did not terminate {enclave_id}: "
                                  f"it answered {result}", file="nitro-cli terminate-enclave",
                                  fix=f"check `nitro-cli describe-enclaves`; stop it with "
                                      f"`nitro-cli terminate-enclave --enclave-id {enclave_id}`")
        return result

