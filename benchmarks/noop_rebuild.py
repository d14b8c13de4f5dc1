"""A no-op `doit build` over a monorepo of many enclaves, side by side with a bare interpreter that imports doit and the rule set.

    .venv/bin/python benchmarks/noop_rebuild.py [--enclaves 50] [--repeat 5] [--profile]

Setup, not timed: a temporary monorepo (this repository's dodo.py, a `cache/`, a development blob
set and N enclaves, each with a tiny app image of its own in an OCI layout beside its
enclaver.yaml), then one `doit -n 2 build` that builds everything (the odyn image first, ~15 s,
then N small EIFs). Timed, in alternating order, `--repeat` times each: the no-op `doit build`
and `doit -n 2 build` (every task up to date; each run's doit report is checked, so a run that
rebuilt anything fails instead of being timed), against the baseline
`python -c "import doit.doit_cmd, enclaver_rules.rules"`: starting the interpreter and importing
doit's command line and the rule set is what any `doit` invocation in a repository pays before it
looks at a single enclave, so the ratio is the cost of everything that scales with the monorepo
(discovery, doit's dependency checks, the resolve actions). `python -c pass` and `doit list`
(tasks loaded, nothing checked) are printed as context. Goal: no-op build <= 3 s on the 2-core
development VM. `--profile` adds one cProfile run of the no-op build and prints its top costs.
"""

from __future__ import annotations

import argparse
import os
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _measure import run  # noqa: E402

GOAL_S = 3.0
EPOCH = "1700000000"
PY = sys.executable
BASELINE = "import doit.doit_cmd, enclaver_rules.rules"


def make_monorepo(root: Path, enclaves: int) -> None:
    """dodo.py, cache/, blobs/ and `services/eNNN/` with enclaver.yaml and a distinct app layout."""
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "tests"))
    from enclaver_rules.eif.blobs import write_dev_blobs
    from enclaver_rules.oci.layer import Entry
    from oci_helpers import make_layout  # type: ignore[import-not-found]  # tests/, as the pipeline test does

    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "dodo.py", root / "dodo.py")  # alone: no examples/, so its examples branch is skipped
    (root / "cache").mkdir()
    write_dev_blobs(root / "blobs", "x86_64")
    for i in range(enclaves):
        name = f"e{i:03}"
        directory = root / "services" / name
        directory.mkdir(parents=True)
        make_layout(str(directory / "app"), "latest",
                    [[Entry.file("bin/app", f"#!/bin/sh\necho {name}\n".encode(), 0o755)]], cmd=("/bin/app",))
        (directory / "enclaver.yaml").write_text(
            f"version: v1\nname: {name}\ntarget: example.test/{name}:release\nsources:\n  app: oci:app:latest\n"
            f"ingress:\n  - listen_port: 8080\nbuild:\n  blobs: ../../blobs\n")


def doit_cmd(root: Path, *args: str, report: Path | None = None) -> list[str]:
    """`python -m doit` on the monorepo's dodo.py (doit then works in its directory)."""
    return [PY, "-m", "doit", args[0], "-f", str(root / "dodo.py"), *(["-o", str(report)] if report else []),
            *args[1:]]


def check_noop(report: Path, enclaves: int) -> None:
    """doit's report: `.  task` ran, `-- task` was up to date. No build may run, nor odyn_image."""
    lines = report.read_text().splitlines()
    ran = [line[3:] for line in lines if line.startswith(".  ") and not line[3:].startswith(("resolve:", "explain:"))]
    skipped = [line for line in lines if line.startswith("-- eif:")]
    if ran or len(skipped) != enclaves:
        raise SystemExit(f"not a no-op: ran {ran[:5]}, {len(skipped)}/{enclaves} EIFs up to date "
                         f"(were this repository's sources edited meanwhile?)")


#: What a no-op build spends its time on, as (label, file suffix, function); cumulative times.
PHASES = (
    ("load dodo.py: import the rule set, discover", "doit/loader.py", "get_module"),
    ("  of which discover() (parses every manifest)", "rules/discover.py", "discover"),
    ("generate the tasks", "doit/cmd_base.py", "load_tasks"),
    ("doit's up-to-date checks, every task", "doit/dependency.py", "get_status"),
    ("  of which eif's uptodate: latest_intact", "rules/eif.py", "latest_intact"),
    ("  of which release's uptodate: release_present", "rules/release.py", "release_present"),
    ("resolve actions (uptodate [False]: every run)", "rules/resolve.py", "resolve_enclave"),
    ("  of which build_settings (manifest again)", "rules/common.py", "build_settings"),
    ("  of which import_oci_layout (app re-imported)", "oci/transfer.py", "import_oci_layout"),
    ("    of which Store.put of blobs it already has", "oci/store.py", "put"),
    ("    of which Store.tag (index.json rewritten)", "oci/store.py", "tag"),
    ("  of which load_blobs (blob set re-hashed)", "eif/blobs.py", "load_blobs"),
    ("doit saves its state (sqlite3)", "doit/dependency.py", "close"),
)


def show_profile(path: Path, enclaves: int, unprofiled: float) -> None:
    stats = pstats.Stats(str(path))
    table: dict[tuple[str, int, str], tuple[int, int, float, float, object]] = stats.stats  # type: ignore[attr-defined]
    total = max(cumtime for _, _, _, cumtime, _ in table.values())
    print(f"\ncProfile of one no-op `doit build`: {total:.2f} s under the profiler ({unprofiled:.2f} s without); "
          f"cumulative seconds, calls, ms per enclave")
    for label, suffix, func in PHASES:
        hits = [(calls, cum) for (file, _, name), (_, calls, _, cum, _) in table.items()
                if name == func and file.endswith(suffix)]
        if not hits:
            print(f"  {label:50} {'(not found)':>8}")
            continue
        cum, calls = sum(h[1] for h in hits), sum(h[0] for h in hits)
        print(f"  {label:50} {cum:7.3f}s {calls:6} {1000 * cum / enclaves:7.1f}")
    print("  most own time:")
    own = sorted(((tottime, calls, _short(file), line, name) for (file, line, name), (_, calls, tottime, _, _)
                  in table.items()), reverse=True)
    for tottime, calls, file, line, name in own[:10]:
        where = name if file == "~" else f"{file}:{line}({name})"
        print(f"  {where[:50]:50} {tottime:7.3f}s {calls:6}")


def _short(file: str) -> str:
    for marker in ("site-packages/", f"{REPO}/", "/lib/"):
        if marker in file:
            return file.split(marker, 1)[1]
    return file


def print_table(times: dict[str, list[float]], rss: dict[str, int], enclaves: int, note: str) -> None:
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["baseline"]
    print(f"no-op `doit build` of {enclaves} enclaves: {len(times['baseline'])} runs each, alternating order; "
          f"{os.cpu_count()} CPUs; {note}")
    print(f"  {'':44} {'median':>8} {'best':>8} {'ratio':>6} {'peak RSS':>10}")
    labels = {"python -c pass": "python -c pass (context)",
              "baseline": "baseline: import doit CLI + enclaver_rules",
              "doit list": "doit list (context: tasks loaded only)",
              "doit build": "doit build (no-op)",
              "doit -n 2 build": "doit -n 2 build (no-op)"}
    for step, label in labels.items():
        print(f"  {label:44} {med[step]:7.3f}s {min(times[step]):7.3f}s {med[step] / base:5.1f}x "
              f"{rss[step] / 1024:6.1f} MiB")
    print(f"  baseline = python -c \"{BASELINE}\"; ratio = median / baseline median")
    worst = max(med["doit build"], med["doit -n 2 build"])
    print(f"  goal: no-op build <= {GOAL_S:.0f} s: {'holds' if worst <= GOAL_S else 'MISSED'} "
          f"(slower median {worst:.2f} s = {worst / base:.1f}x the baseline; "
          f"{1000 * (med['doit build'] - base) / enclaves:.1f} ms per enclave above it)")


def first_build(root: Path) -> float:
    """The setup build (`doit -n 2 build` of everything); its seconds."""
    start = time.perf_counter()
    result = subprocess.run(doit_cmd(root, "run", "-n", "2", "build"), capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"the first build failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return elapsed


def settle(root: Path, report: Path, enclaves: int) -> None:
    """Untimed no-op runs until one rebuilt nothing: absorbs an edit made meanwhile to this repository's
    sources (the odyn image and the check tasks depend on them), and warms the bytecode and page caches."""
    for _ in range(3):
        run(doit_cmd(root, "run", "build", report=report))
        try:
            check_noop(report, enclaves)
            return
        except SystemExit as e:
            print(f"warm-up: {e}; again ...", file=sys.stderr)
    check_noop(report, enclaves)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--enclaves", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--profile", nargs="?", const="", metavar="FILE",
                        help="also profile one no-op build and print where its time goes (keep the .prof in FILE)")
    parser.add_argument("--no-bytecode-cache", action="store_true",
                        help="keep PYTHONDONTWRITEBYTECODE as it is (default: children cache bytecode in a temp dir)")
    parser.add_argument("--make-monorepo", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make_monorepo:
        make_monorepo(Path(args.make_monorepo), args.enclaves)
        return 0
    os.environ["SOURCE_DATE_EPOCH"] = EPOCH
    os.environ.pop("ENC_CACHE_DIR", None)  # the cache/ beside the monorepo's dodo.py
    with tempfile.TemporaryDirectory(prefix="enclaver-noop-bench-") as tmp:
        root, report = Path(tmp) / "repo", Path(tmp) / "report.txt"
        print(f"making a monorepo of {args.enclaves} enclaves ...", file=sys.stderr)
        # in a child: this process stays small, or the children it forks inherit its high-water mark
        subprocess.run([PY, __file__, "--make-monorepo", str(root), "--enclaves", str(args.enclaves)], check=True)
        print("first `doit -n 2 build` (the odyn image, ~15 s, then every EIF) ...", file=sys.stderr)
        first_s = first_build(root)
        bytecode = "as the environment says"
        if not args.no_bytecode_cache:
            # as in a developer's checkout: compiled modules are reused. Kept in the temp dir, so
            # nothing is written into the repository.
            os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
            os.environ["PYTHONPYCACHEPREFIX"] = str(Path(tmp) / "pycache")
            bytecode = "cached (warm)"
        elif os.environ.get("PYTHONDONTWRITEBYTECODE"):
            bytecode = "not cached (PYTHONDONTWRITEBYTECODE)"
        steps: dict[str, list[str]] = {
            "python -c pass": [PY, "-c", "pass"],
            "baseline": [PY, "-c", BASELINE],
            "doit list": doit_cmd(root, "list"),
            "doit build": doit_cmd(root, "run", "build", report=report),
            "doit -n 2 build": doit_cmd(root, "run", "-n", "2", "build", report=report),
        }
        for step in ("python -c pass", "baseline", "doit list"):
            run(steps[step])  # warm-up: page cache, bytecode
        settle(root, report, args.enclaves)
        times: dict[str, list[float]] = {k: [] for k in steps}
        rss: dict[str, int] = dict.fromkeys(steps, 0)
        for round_ in range(args.repeat):
            order = list(steps) if round_ % 2 == 0 else list(reversed(steps))
            for step in order:
                elapsed, peak = run(steps[step])
                if "build" in step:
                    check_noop(report, args.enclaves)
                times[step].append(elapsed)
                rss[step] = max(rss[step], peak)
        print_table(times, rss, args.enclaves, f"bytecode {bytecode}; setup build took {first_s:.0f} s")
        if args.profile is not None:
            prof = Path(args.profile) if args.profile else Path(tmp) / "noop.prof"
            run([PY, "-m", "cProfile", "-o", str(prof), *steps["doit build"][1:]])
            check_noop(report, args.enclaves)
            show_profile(prof, args.enclaves, statistics.median(times["doit build"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
