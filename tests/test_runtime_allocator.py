"""Allocator advice, the allocator file's rules (aws-nitro-enclaves-cli bootstrap/nitro-enclaves-allocator)
and --configure-allocator's write."""

from __future__ import annotations

import stat
from collections.abc import Sequence
from pathlib import Path

import pytest

from enclaver_rules.errors import InvalidInput, OperationFailed
from enclaver_rules.manifest.model import Defaults, Manifest, Sources
from enclaver_rules.runtime import allocator as al
from enclaver_rules.runtime.nitro_cli import Completed

# bootstrap/allocator.yaml as AWS ships it
SHIPPED = """---
# Enclave configuration file.
#
# How much memory to allocate for enclaves (in MiB).
memory_mib: 512
#
# How many CPUs to reserve for enclaves.
cpu_count: 2
#
# Alternatively, the exact CPUs to be reserved for the enclave can be explicitly
# configured by using `cpu_pool` (like below), instead of `cpu_count`.
# Note: cpu_count and cpu_pool conflict with each other. Only use exactly one of them.
# Example of reserving CPUs 2, 3, and 6 through 9:
# cpu_pool: 2,3,6-9
"""
MiB = 1 << 20


def test_shipped_file_parses() -> None:
    assert al.parse(SHIPPED) == al.AllocatorConfig(512, 2, None)
    assert al.parse("---\nmemory_mib: 4096\ncpu_pool: 2,3,6-9\n").cpu_pool == (2, 3, 6, 7, 8, 9)


@pytest.mark.parametrize("text, needle", [
    ("memory_mib: 512\ncpu_count: 2\n", "no `---` line"),
    ("memory_mib: 512\n---\ncpu_count: 2\n", "memory_mib is above `---`"),
    ("---\nmemory_mib: 512\ncpu_count: 2\nhugepages: 1\n", "unexpected key hugepages"),
    ("---\nmemory_mib: 512 # half a GiB\ncpu_count: 2\n", "a comment after the value"),
    ("---\nmemory_mib: 512\ncpu_count: 2\ncpu_pool: 1,2\n", "both set"),
    ("---\nmemory_mib: 512\n", "neither cpu_count nor cpu_pool"),
    ("---\nmemory_mib: lots\ncpu_count: 2\n", "memory_mib is missing"),
    ("---\nmemory_mib: 512\ncpu_count: 0\n", "cpu_count is not a positive"),
    ("---\nmemory_mib: 512\ncpu_pool: 3-1\n", "runs backwards"),
    ("---\nmemory_mib: 512\ncpu_pool: 1,1\n", "names a CPU twice"),
    ("---\nmemory_mib: 512\ncpu_pool: all\n", "not a list of CPUs"),
    ("---\nmemory_mib: [\n", "not YAML"),
])
def test_what_the_allocator_service_would_refuse_is_refused(text: str, needle: str) -> None:
    with pytest.raises(InvalidInput, match=needle.replace("`", ".").replace("[", r"\[")):
        al.parse(text, "/etc/nitro_enclaves/allocator.yaml")


def test_problems_are_reported_together_with_their_lines() -> None:
    with pytest.raises(InvalidInput) as e:
        al.parse("---\nmemory_mib: 512 # x\nswap: 1\ncpu_count: 2\n", "a.yaml")
    assert [(d.line, d.field) for d in e.value.diagnostics][:2] == [(2, "memory_mib"), (3, "swap")]


def test_yaml_is_loaded_safely() -> None:
    with pytest.raises(InvalidInput):
        al.parse("---\nmemory_mib: !!python/object/apply:os.system ['true']\ncpu_count: 2\n")


def test_load(tmp_path: Path) -> None:
    assert al.load(tmp_path / "none.yaml") is None
    (tmp_path / "a.yaml").write_text(SHIPPED)
    assert al.load(tmp_path / "a.yaml") == al.AllocatorConfig(512, 2)
    (tmp_path / "big.yaml").write_text("#" * (al.MAX_FILE + 1))
    with pytest.raises(InvalidInput, match="larger than"):
        al.load(tmp_path / "big.yaml")


def test_eif_floor_is_four_times_its_size_in_whole_mib() -> None:
    assert al.eif_min_memory_mib(0) == 0
    assert al.eif_min_memory_mib(1) == 4
    assert al.eif_min_memory_mib(11 * MiB) == 44
    assert al.eif_min_memory_mib(537 * MiB - 1) == 2148  # the workshop's E26: "minimum memory should be 2148 MB"


def test_needs_take_the_flag_then_the_manifest() -> None:
    manifest = Manifest(name="hello", target="t", sources=Sources(app="app:latest"), defaults=Defaults(4, 3072))
    assert al.needs(manifest, 100 * MiB) == al.Needs(3072, 4, 400)
    assert al.needs(manifest, 100 * MiB, memory_mb=1024, cpu_count=2) == al.Needs(1024, 2, 400)


def test_advice_when_everything_fits() -> None:
    advice = al.advise(al.Needs(512, 2, 100), al.AllocatorConfig(512, 2))
    assert advice.ok and advice.text == "" and advice.memory_mib is None


def test_advice_for_too_little_memory_names_the_key_the_file_and_the_fix() -> None:
    advice = al.advise(al.Needs(2048, 2, 100), al.AllocatorConfig(512, 2))
    assert advice.text == ("the enclave needs 2048 MiB but the allocator reserves 512 MiB: set memory_mib: 2048 in "
                           "/etc/nitro_enclaves/allocator.yaml and `systemctl restart nitro-enclaves-allocator.service`, "
                           "or run with --configure-allocator")
    assert (advice.memory_mib, advice.cpu_count) == (2048, None)


def test_advice_counts_enclaves_already_running() -> None:
    advice = al.advise(al.Needs(1024, 2, 100), al.AllocatorConfig(2048, 4), in_use_memory_mib=1536, in_use_cpus=2)
    assert "(1536 MiB held by enclaves running now)" in advice.text and "memory_mib: 2560" in advice.text
    assert advice.ok is False and advice.cpu_count is None  # 2 + 2 CPUs fit in 4


def test_advice_for_an_eif_larger_than_the_memory_asked() -> None:
    advice = al.advise(al.Needs(1024, 2, 2148), al.AllocatorConfig(4096, 2))
    assert advice.problems == ("the EIF needs at least 2148 MiB (4 × its size, nitro-cli's rule) but the enclave is "
                               "given 1024 MiB: set defaults.memory_mb: 2148 in enclaver.yaml or pass --memory-mb 2148",)
    assert "memory_mib: 2148" in al.advise(al.Needs(1024, 2, 2148), al.AllocatorConfig(1024, 2)).text


def test_advice_for_cpus() -> None:
    count = al.advise(al.Needs(512, 4, 1), al.AllocatorConfig(512, 2))
    assert "needs 4 CPUs but the allocator reserves 2: set cpu_count: 4" in count.text and count.cpu_count == 4
    pool = al.advise(al.Needs(512, 4, 1), al.AllocatorConfig(512, None, (2, 3)))
    assert "cpu_pool has 2: add CPUs to cpu_pool" in pool.text and "--cpu-count 2" in pool.text
    assert pool.cpu_count is None  # enclaver never picks CPUs


def test_advice_without_an_allocator_file() -> None:
    advice = al.advise(al.Needs(512, 2, 1), None, path="/x/allocator.yaml")
    assert "there is no /x/allocator.yaml" in advice.text and (advice.memory_mib, advice.cpu_count) == (512, 2)


# ---- configure ----

def test_configure_is_never_silent(tmp_path: Path) -> None:
    path = tmp_path / "allocator.yaml"
    path.write_text(SHIPPED)
    with pytest.raises(InvalidInput, match="--configure-allocator"):
        al.configure(path, memory_mib=2048, cpu_count=2, allowed=False)
    assert path.read_text() == SHIPPED and not list(tmp_path.glob("*.bak*"))


def test_configure_keeps_comments_and_mode_and_backs_up(tmp_path: Path) -> None:
    path = tmp_path / "allocator.yaml"
    path.write_text(SHIPPED)
    path.chmod(0o640)
    change = al.configure(path, memory_mib=2048, cpu_count=4, allowed=True)
    assert change is not None and change.summary == ("memory_mib: 512 → 2048", "cpu_count: 2 → 4")
    after = path.read_text()
    assert after == SHIPPED.replace("memory_mib: 512", "memory_mib: 2048").replace("cpu_count: 2", "cpu_count: 4")
    assert al.parse(after) == al.AllocatorConfig(2048, 4)
    assert change.backup == str(tmp_path / "allocator.yaml.bak") and Path(change.backup).read_text() == SHIPPED
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["allocator.yaml", "allocator.yaml.bak"]  # no temp left


def test_configure_never_lowers_and_says_when_nothing_changes(tmp_path: Path) -> None:
    path = tmp_path / "allocator.yaml"
    path.write_text(SHIPPED.replace("512", "8192"))
    assert al.configure(path, memory_mib=2048, cpu_count=2, allowed=True) is None
    change = al.configure(path, memory_mib=2048, cpu_count=6, allowed=True)
    assert change is not None and change.summary == ("cpu_count: 2 → 6",) and "memory_mib: 8192" in path.read_text()


def test_configure_keeps_every_backup(tmp_path: Path) -> None:
    path = tmp_path / "allocator.yaml"
    path.write_text(SHIPPED)
    first = al.configure(path, memory_mib=1024, cpu_count=None, allowed=True)
    second = al.configure(path, memory_mib=2048, cpu_count=None, allowed=True)
    assert first and second and (first.backup, second.backup) == (str(path) + ".bak", str(path) + ".bak.1")
    assert "memory_mib: 512" in Path(first.backup).read_text()  # type: ignore[arg-type]
    assert "memory_mib: 1024" in Path(second.backup).read_text()  # type: ignore[arg-type]


def test_configure_writes_a_new_file_the_service_accepts(tmp_path: Path) -> None:
    path = tmp_path / "allocator.yaml"
    change = al.configure(path, memory_mib=2048, cpu_count=None, allowed=True)
    assert change is not None and change.backup is None
    assert al.parse(path.read_text()) == al.AllocatorConfig(2048, 2)
    assert path.read_text().splitlines()[1] == "---"


def test_configure_never_picks_cpus_from_a_pool(tmp_path: Path) -> None:
    path = tmp_path / "allocator.yaml"
    text = "---\nmemory_mib: 512\ncpu_pool: 2,3\n"
    path.write_text(text)
    with pytest.raises(InvalidInput, match="does not choose CPUs"):
        al.configure(path, memory_mib=4096, cpu_count=4, allowed=True)
    assert path.read_text() == text  # nothing written, memory included
    change = al.configure(path, memory_mib=4096, cpu_count=2, allowed=True)
    assert change is not None and path.read_text() == "---\nmemory_mib: 4096\ncpu_pool: 2,3\n"


def test_configure_refuses_a_file_the_service_would_refuse(tmp_path: Path) -> None:
    path = tmp_path / "allocator.yaml"
    path.write_text("---\nmemory_mib: 512\ncpu_count: 2\nextra: 1\n")
    with pytest.raises(InvalidInput, match="unexpected key extra"):
        al.configure(path, memory_mib=4096, cpu_count=2, allowed=True)
    for bad in (0, -1, True, "2048"):
        with pytest.raises(InvalidInput):
            al.configure(path, memory_mib=bad, cpu_count=None, allowed=True)  # type: ignore[arg-type]


# ---- restart, through a fake runner ----

class FakeRunner:
    def __init__(self, code: int = 0, stderr: bytes = b"") -> None:
        self.code, self.stderr, self.calls = code, stderr, []  # type: ignore[var-annotated]

    def __call__(self, argv: Sequence[str], timeout: float) -> Completed:
        self.calls.append((list(argv), timeout))
        return Completed(tuple(argv), self.code, b"", self.stderr)


def test_restart_runs_systemctl() -> None:
    runner = FakeRunner()
    al.restart(runner)
    assert runner.calls == [(["systemctl", "restart", "nitro-enclaves-allocator.service"], 300.0)]


def test_restart_failure_says_why_and_what_to_do() -> None:
    runner = FakeRunner(1, b"Job for nitro-enclaves-allocator.service failed because the control process exited")
    with pytest.raises(OperationFailed, match="exit code 1") as e:
        al.restart(runner)
    assert "stop running enclaves" in e.value.diagnostics[0].fix and "journalctl" in e.value.diagnostics[0].fix
