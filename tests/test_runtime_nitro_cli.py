"""The nitro-cli contract (arguments, JSON output, errors), pinned against `tests/data/nitro-cli-standin`:
a stand-in that records its arguments and replays canned answers shaped like aws-nitro-enclaves-cli
1.5.0's (src/common/json_output.rs, src/common/mod.rs construct_error_message). It is not nitro-cli."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import pytest

from conftest import REPO
from enclaver_rules.errors import EnclaverError, InvalidInput, OperationFailed
from enclaver_rules.runtime import nitro_cli as nc

STANDIN = REPO / "tests" / "data" / "nitro-cli-standin"
ENCLAVE_ID = "i-0123456789abcdef0-enc18d6f0a1b2c3d4e5"

RUN_JSON = json.dumps({"EnclaveName": "hello", "EnclaveID": ENCLAVE_ID, "ProcessID": 4242, "EnclaveCID": 16,
                       "NumberOfCPUs": 2, "CPUIDs": [1, 3], "MemoryMiB": 2048}, indent=2) + "\n"
DESCRIBE_JSON = json.dumps([{"EnclaveName": "hello", "EnclaveID": ENCLAVE_ID, "ProcessID": 4242, "EnclaveCID": 16,
                             "NumberOfCPUs": 2, "CPUIDs": [1, 3], "MemoryMiB": 2048, "State": "RUNNING",
                             "Flags": "DEBUG_MODE", "Measurements": {"PCR0": "00" * 48}}], indent=2) + "\n"
TERMINATE_JSON = json.dumps({"EnclaveName": "hello", "EnclaveID": ENCLAVE_ID, "Terminated": True}, indent=2) + "\n"


def error_block(code: str, text: str, log: str) -> str:
    """One error as nitro-cli prints it (src/common/mod.rs construct_error_message, no BACKTRACE)."""
    return (f"[ {code} ] {text}\n\nFor more details, please visit "
            f"https://docs.aws.amazon.com/enclaves/latest/user/cli-errors.html#{code}\n\n"
            f"If you open a support ticket, please provide the error log found at \"{log}\"\n")


def run_failure(code: str, text: str, logdir: Path, stamp: str = "2025-10-05T13:14:56.731022593+00:00") -> dict:
    """A failed run-enclave: the root error, then 'Failed connections: 1' and E39; exit code 39."""
    root, e39 = logdir / f"err{stamp}.log", logdir / f"err{stamp}-39.log"
    stderr = ("Start allocating memory...\n" + error_block(code, text, str(root)) + "Failed connections: 1\n"
              + error_block("E39", "Enclave process connection failure.", str(e39)))
    return {"stdout": "", "stderr": stderr, "code": 39}


E29 = "Ioctl failure. Such error is used as a general ioctl error and appears whenever an ioctl fails."


@pytest.fixture
def standin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    state = tmp_path / "standin"
    state.mkdir()
    logdir = tmp_path / "logs"
    logdir.mkdir()
    monkeypatch.setenv("NITRO_CLI_STANDIN_DIR", str(state))
    slept: list[float] = []

    class Standin:
        logs = logdir
        sleeps = slept

        def replies(self, *replies: dict) -> None:
            (state / "replies.json").write_text(json.dumps(list(replies)))

        def calls(self) -> list[list[str]]:
            path = state / "calls.jsonl"
            return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

        def cli(self, **kw: object) -> nc.NitroCli:
            return nc.NitroCli(executable=str(STANDIN), sleep=slept.append, log_dirs=[str(logdir)], **kw)  # type: ignore[arg-type]

    return Standin()


ARGS = nc.RunEnclaveArgs("/enclave/application.eif", cpu_count=2, memory_mib=2048)


def test_the_standin_is_named_as_such_and_executable() -> None:
    assert STANDIN.name == "nitro-cli-standin" and os.access(STANDIN, os.X_OK)
    assert "NOT nitro-cli" in STANDIN.read_text()


# ---- arguments ----

def test_run_enclave_arguments() -> None:
    assert ARGS.argv() == ["run-enclave", "--cpu-count", "2", "--memory", "2048", "--eif-path", "/enclave/application.eif"]
    full = nc.RunEnclaveArgs("a.eif", 4, 4096, debug_mode=True, enclave_cid=16, enclave_name="hello")
    assert full.argv() == ["run-enclave", "--cpu-count", "4", "--memory", "4096", "--eif-path", "a.eif",
                           "--debug-mode", "--enclave-cid", "16", "--enclave-name", "hello"]
    assert "--attach-console" not in full.argv()


@pytest.mark.parametrize("kw, field", [
    ({"cpu_count": 0}, "defaults.cpu_count"), ({"cpu_count": True}, "defaults.cpu_count"),
    ({"memory_mib": 63}, "defaults.memory_mb"), ({"eif_path": "--debug-mode"}, "eif"), ({"eif_path": ""}, "eif"),
    ({"enclave_cid": 3}, "--enclave-cid"), ({"enclave_cid": 2**32 - 1}, "--enclave-cid"), ({"enclave_cid": 0}, "--enclave-cid"),
    ({"enclave_name": "-x"}, "--enclave-name"), ({"enclave_name": "a\nb"}, "--enclave-name")])
def test_run_arguments_refuse_what_nitro_cli_or_upstream_would(kw: dict, field: str) -> None:
    base = {"eif_path": "a.eif", "cpu_count": 2, "memory_mib": 2048} | kw
    with pytest.raises(InvalidInput) as e:
        nc.RunEnclaveArgs(**base)
    assert e.value.diagnostics[0].field == field


def test_upstream_messages_for_too_few_cpus_and_too_little_memory() -> None:
    with pytest.raises(InvalidInput, match="at least 1 CPU is required, got: 0"):
        nc.RunEnclaveArgs("a.eif", 0, 2048)
    with pytest.raises(InvalidInput, match="at least 64MiB of memory are required, got: 8"):
        nc.RunEnclaveArgs("a.eif", 1, 8)


def test_describe_and_terminate_arguments() -> None:
    assert nc.describe_argv() == ["describe-enclaves"]
    assert nc.terminate_argv(ENCLAVE_ID) == ["terminate-enclave", "--enclave-id", ENCLAVE_ID]
    for bad in ("--all", "", "a b", "x" * 200):
        with pytest.raises(InvalidInput):
            nc.terminate_argv(bad)


# ---- through the stand-in ----

def test_run_enclave_passes_the_arguments_and_parses_the_answer(standin) -> None:
    standin.replies({"stdout": RUN_JSON, "stderr": "Start allocating memory...\nStarted enclave with enclave-cid: 16\n"})
    enclave = standin.cli().run_enclave(nc.RunEnclaveArgs("/e.eif", 2, 2048, debug_mode=True))
    assert standin.calls() == [["run-enclave", "--cpu-count", "2", "--memory", "2048", "--eif-path", "/e.eif",
                                "--debug-mode"]]
    assert enclave == nc.Enclave("hello", ENCLAVE_ID, 4242, 16, (1, 3), 2048)
    assert enclave.cid == 16 and enclave.cpu_count == 2 and standin.sleeps == []


def test_e29_twice_then_success_is_retried_with_backoff(standin, caplog: pytest.LogCaptureFixture) -> None:
    standin.replies(run_failure("E29", E29, standin.logs, "1"), run_failure("E29", E29, standin.logs, "2"),
                    {"stdout": RUN_JSON})
    enclave = standin.cli(backoff=0.5).run_enclave(ARGS)
    assert enclave.enclave_id == ENCLAVE_ID
    assert len(standin.calls()) == 3 and all(c == ARGS.argv() for c in standin.calls())
    assert standin.sleeps == [0.5, 1.0]
    retries = [r for r in caplog.records if "E29" in r.getMessage()]
    assert [r.levelname for r in retries] == ["WARNING", "WARNING"]
    assert "retry 1 of 3" in retries[0].getMessage() and str(standin.logs / "err1.log") in retries[0].getMessage()


def test_e29_retries_are_bounded_and_the_error_says_so(standin) -> None:
    standin.replies(*(run_failure("E29", E29, standin.logs, str(i)) for i in range(3)))
    with pytest.raises(OperationFailed) as e:
        standin.cli(retries=2).run_enclave(ARGS)
    assert len(standin.calls()) == 3 and standin.sleeps == [2.0, 4.0]
    text = str(e.value)
    assert "nitro-cli run-enclave failed after 3 attempts (exit code 39; E29 Ioctl failure" in text
    assert "issue 433" in e.value.diagnostics[0].fix


def test_other_errors_are_not_retried(standin) -> None:
    text = ("Insufficient memory requested. User provided `memory` is 512 MB, but based on the EIF file size, "
            "the minimum memory should be 2148 MB")
    standin.replies(run_failure("E26", text, standin.logs))
    with pytest.raises(OperationFailed) as e:
        standin.cli().run_enclave(nc.RunEnclaveArgs("/e.eif", 2, 512))
    assert len(standin.calls()) == 1 and standin.sleeps == []
    diag = e.value.diagnostics[0]
    assert "exit code 39; E26 Insufficient memory requested" in diag.message
    assert "the minimum memory should be 2148 MB" in diag.message
    assert "4 × the EIF's size" in diag.fix and "above 512 MiB" in diag.fix
    assert diag.file == f"{STANDIN} run-enclave"


def test_e27_fix_is_the_allocator(standin) -> None:
    standin.replies(run_failure("E27", "Insufficient memory available.", standin.logs))
    with pytest.raises(OperationFailed) as e:
        standin.cli().run_enclave(ARGS)
    fix = e.value.diagnostics[0].fix
    assert "memory_mib" in fix and "/etc/nitro_enclaves/allocator.yaml" in fix and "--configure-allocator" in fix
    assert "2048 MiB" in fix


def test_a_failure_surfaces_nitro_clis_error_log(standin) -> None:
    standin.replies(run_failure("E36", "Enclave boot failure.", standin.logs, "boot"))
    (standin.logs / "errboot.log").write_text("  Action: Run Enclave\n  Subactions:\n    Waiting on enclave to boot "
                                              "failed with error VsockTimeoutError\n  Root error line: 572\n")
    with pytest.raises(OperationFailed) as e:
        standin.cli().run_enclave(ARGS)
    text = str(e.value)
    assert f"nitro-cli's error log {standin.logs / 'errboot.log'}:" in text
    assert "Waiting on enclave to boot failed with error VsockTimeoutError" in text
    assert "(could not read it: No such file or directory)" in text  # the E39 log was never written
    assert "development blob set cannot boot" in e.value.diagnostics[0].fix


def test_error_log_is_read_bounded_and_only_from_nitro_clis_directory(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    big = logs / "errbig.log"
    big.write_bytes(b"a" * 100 + b"\x1b[31mTAIL")
    assert nc.read_error_log(str(big), [str(logs)], limit=9) == "(first 100 bytes left out)\n\\x1b[31mTAIL"
    secret = tmp_path / "errsecret.log"
    secret.write_text("do not show")
    assert "outside nitro-cli's log directory" in nc.read_error_log(str(secret), [str(logs)])
    assert "not a nitro-cli error log" in nc.read_error_log("/etc/shadow", [str(logs)])
    assert "not a nitro-cli error log" in nc.read_error_log("errx.log", [str(logs)])  # relative
    (logs / "errlink.log").symlink_to(secret)
    assert "could not read it" in nc.read_error_log(str(logs / "errlink.log"), [str(logs)])
    os.mkfifo(logs / "errfifo.log")
    assert nc.read_error_log(str(logs / "errfifo.log"), [str(logs)]) == "(not read: not a regular file)"
    escape = logs / "sub"
    escape.mkdir()
    assert "outside" in nc.read_error_log(str(escape / ".." / ".." / "errsecret.log"), [str(logs)])


def test_log_directory_follows_nitro_clis_variable() -> None:
    assert nc.default_log_dirs({}) == ("/var/log/nitro_enclaves",)
    assert nc.default_log_dirs({"NITRO_CLI_LOGS_PATH": "/tmp/x"}) == ("/tmp/x",)


def test_describe_and_terminate_through_the_standin(standin) -> None:
    standin.replies({"stdout": DESCRIBE_JSON}, {"stdout": "[]\n"},
                    {"stdout": TERMINATE_JSON, "stderr": f"Successfully terminated enclave {ENCLAVE_ID}.\n"})
    cli = standin.cli()
    (enclave,) = cli.describe_enclaves()
    assert enclave.state == "RUNNING" and enclave.debug_mode and enclave.memory_mib == 2048
    assert cli.describe_enclaves() == ()
    assert cli.terminate_enclave(ENCLAVE_ID) == nc.Termination(ENCLAVE_ID, True, "hello")
    assert standin.calls() == [["describe-enclaves"], ["describe-enclaves"], ["terminate-enclave", "--enclave-id", ENCLAVE_ID]]


def test_terminate_must_name_the_enclave_and_say_terminated(standin) -> None:
    other = json.dumps({"EnclaveID": "i-1-enc2", "Terminated": True})
    standin.replies({"stdout": other}, {"stdout": json.dumps({"EnclaveID": ENCLAVE_ID, "Terminated": False})})
    for _ in range(2):
        with pytest.raises(OperationFailed, match=f"did not terminate {ENCLAVE_ID}"):
            standin.cli().terminate_enclave(ENCLAVE_ID)


def test_terminate_failure_names_command_and_exit_code(standin) -> None:
    standin.replies({"stderr": error_block("E40", "Socket path not found.", str(standin.logs / "errt.log")), "code": 40})
    with pytest.raises(OperationFailed, match=r"nitro-cli terminate-enclave failed \(exit code 40; E40 Socket path"):
        standin.cli().terminate_enclave(ENCLAVE_ID)


def test_a_failure_without_an_error_code_still_reports(standin) -> None:
    standin.replies({"stderr": "error: unexpected argument '--bogus' found\n", "code": 2})
    with pytest.raises(OperationFailed) as e:
        standin.cli().describe_enclaves()
    assert "exit code 2; no error code" in str(e.value) and "unexpected argument" in str(e.value)


def test_missing_executable_and_timeout(tmp_path: Path) -> None:
    with pytest.raises(OperationFailed, match="not found") as e:
        nc.NitroCli(executable=str(tmp_path / "nope")).describe_enclaves()
    assert "nitro-cli" in e.value.diagnostics[0].fix
    slow = tmp_path / "slow"
    slow.write_text("#!/bin/sh\nexec sleep 30\n")
    slow.chmod(0o755)
    with pytest.raises(OperationFailed, match=r"did not finish within 0\.2 s"):
        nc.NitroCli(executable=str(slow), timeouts={"describe-enclaves": 0.2}).describe_enclaves()


def test_the_runner_is_injectable() -> None:
    seen: list[tuple[list[str], float]] = []

    def runner(argv: Sequence[str], timeout: float) -> nc.Completed:
        seen.append((list(argv), timeout))
        return nc.Completed(tuple(argv), 0, b"[]", b"")

    assert nc.NitroCli(runner).describe_enclaves() == ()
    assert seen == [(["nitro-cli", "describe-enclaves"], 60.0)]


# ---- hostile output ----

def _run(**changes: object) -> str:
    data = json.loads(RUN_JSON) | changes
    return json.dumps({k: v for k, v in data.items() if v is not _DROP})


_DROP = object()


@pytest.mark.parametrize("stdout", [
    "", "not json", "[]", "null", "NaN", "[" * 100000,
    _run(EnclaveCID=2), _run(EnclaveCID=3), _run(EnclaveCID=2**32 - 1), _run(EnclaveCID="16"), _run(EnclaveCID=True),
    _run(EnclaveID="--all"), _run(EnclaveID=None), _run(EnclaveName="a\x1bb"), _run(EnclaveName=_DROP),
    _run(ProcessID=0), _run(NumberOfCPUs=3), _run(CPUIDs=[]), _run(CPUIDs=[1, 1]), _run(CPUIDs=[-1, 2]),
    _run(MemoryMiB=0), _run(MemoryMiB=2048.0), "{" + '"a":1,' * 10 + '"b":' + "1" * 5000 + "}",
])
def test_run_output_that_is_not_nitro_clis_is_refused(stdout: str) -> None:
    with pytest.raises(OperationFailed, match="printed output enclaver cannot use"):
        nc.parse_run(stdout)


def test_oversized_output_is_refused_without_parsing() -> None:
    with pytest.raises(OperationFailed, match="at most"):
        nc.parse_run(b" " * (nc.MAX_OUTPUT + 1))


@pytest.mark.parametrize("change", [{"State": "running"}, {"State": None}, {"Flags": "ALL"}, {"EnclaveCID": 1}])
def test_describe_output_is_checked(change: dict) -> None:
    data = json.loads(DESCRIBE_JSON)
    data[0] |= change
    with pytest.raises(OperationFailed):
        nc.parse_describe(json.dumps(data))
    with pytest.raises(OperationFailed):
        nc.parse_describe(json.dumps(data[0]))  # an object, not a list


def test_describe_name_is_optional_as_in_nitro_cli() -> None:
    data = json.loads(DESCRIBE_JSON)
    del data[0]["EnclaveName"]
    assert nc.parse_describe(json.dumps(data))[0].name == ""


@pytest.mark.parametrize("stdout", ['{"EnclaveID": "x y", "Terminated": true}', '{"EnclaveID": "a", "Terminated": 1}',
                                    '[]', '{"EnclaveID": "a", "Terminated": true, "EnclaveName": 5}'])
def test_terminate_output_is_checked(stdout: str) -> None:
    with pytest.raises(OperationFailed):
        nc.parse_terminate(stdout)


def test_failure_parsing_takes_the_first_code_as_the_root(tmp_path: Path) -> None:
    failure = nc.parse_failure(run_failure("E29", E29, tmp_path, "x")["stderr"].encode())
    assert [c for c, _ in failure.codes] == ["E29", "E39"] and failure.root == "E29"
    assert failure.log_paths == (str(tmp_path / "errx.log"), str(tmp_path / "errx-39.log"))
    assert nc.parse_failure(b"\xff\xfe garbage").root == ""


def test_errors_are_enclaver_errors() -> None:
    assert issubclass(OperationFailed, EnclaverError)
