"""A no-op `doit build` over a monorepo of many enclaves with realistic apps, side by side with a bare interpreter that imports doit and the rule set.

    .venv/bin/python benchmarks/noop_rebuild.py [--enclaves 50] [--app-mib 256] [--repeat 5] [--profile]

Setup, not timed: a temporary monorepo (this repository's dodo.py, a `cache/`, a development blob
set and N enclaves, each with an app image of its own in an OCI layout beside its enclaver.yaml:
a base layer of `--app-mib` MiB shared by all, one file hard-linked into every layout as services
of one monorepo share a base image, under a small layer of the enclave's own), then one
`doit -n 2 build` that builds everything (the odyn and runtime images first, then N EIFs of about
the app's size). The disk it needs is checked first. Timed, in alternating order, `--repeat` times
each: the no-op `doit build` and `doit -n 2 build` (every task up to date; each run's doit report is
checked, so a run that rebuilt anything fails instead of being timed), against the baseline
`python -c "import doit.doit_cmd, enclaver_rules.rules"`: starting the interpreter and importing
doit's command line and the rule set is what any `doit` invocation in a repository pays before it
looks at a single enclave, so the ratio is the cost of everything that scales with the monorepo
(discovery, doit's dependency checks, the resolve actions). `python -c pass` and `doit list`
(tasks loaded, nothing checked) are printed as context, and every step's peak RSS. Goal (issue 20):
no-op build <= 1 s + 10 ms per enclave (1.5 s at 50 enclaves, 3 s at 200) on the 2-core
development VM, whatever the apps weigh; a slower median is a MISS. `--profile` adds one cProfile
run of the no-op build and prints its top costs; `--keep DIR` keeps the monorepo for another run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
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

EPOCH = "1700000000"
PY = sys.executable
BASELINE = "import doit.doit_cmd, enclaver_rules.rules"


#: The base layer's files: this many, each a repeated random block of BLOCK bytes (different per file).
FILES = 16
BLOCK = 16 << 10


def _base_layer(path: Path, app_mib: int) -> tuple[str, int]:
    """A plain (uncompressed) tar of `app_mib` MiB of files, written to `path`; its sha256 and size.

    Uncompressed, as `docker save` and `skopeo copy docker-daemon:… oci:…` write layers, so the bytes
    on disk are the app's size. Each file repeats a 16 KiB random block: sha256 costs the same on any
    bytes, and gzip (the release image's layer, which holds the EIF) shrinks it, so the setup's disk
    use is about one EIF per enclave instead of two.
    """
    import hashlib
    import io
    import tarfile

    per_file = (app_mib << 20) // FILES

    class Pattern(io.RawIOBase):
        def __init__(self, block: bytes, size: int) -> None:
            self.block, self.left = block, size

        def readable(self) -> bool:
            return True

        def read(self, n: int = -1) -> bytes:
            n = self.left if n < 0 else min(n, self.left)
            out = (self.block * (n // len(self.block) + 1))[:n]
            self.left -= n
            return out

    with open(path, "wb") as f, tarfile.open(fileobj=f, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for i in range(FILES):
            info = tarfile.TarInfo(f"srv/data/part{i:02}")
            info.size, info.mode = per_file, 0o644
            tar.addfile(info, Pattern(os.urandom(BLOCK), per_file))
    hasher = hashlib.sha256()
    with open(path, "rb") as layer:
        while chunk := layer.read(1 << 20):
            hasher.update(chunk)
    return hasher.hexdigest(), path.stat().st_size


def make_monorepo(root: Path, enclaves: int, app_mib: int) -> None:
    """dodo.py, cache/, blobs/ and `services/eNNN/` with enclaver.yaml and its own app image in an
    OCI layout: a shared base layer of `app_mib` MiB (one file, hard-linked into every layout, as
    services of one monorepo share a base image) under a small layer of the enclave's own."""
    sys.path.insert(0, str(REPO))
    from enclaver_rules.eif.blobs import write_dev_blobs
    from enclaver_rules.oci import mediatypes as mt
    from enclaver_rules.oci.layer import Entry, write_layer
    from enclaver_rules.oci.model import Descriptor
    from enclaver_rules.oci.mutate import canonical_json
    from enclaver_rules.oci.store import Store

    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "dodo.py", root / "dodo.py")  # alone: no examples/, so its examples branch is skipped
    (root / "cache").mkdir()
    write_dev_blobs(root / "blobs", "x86_64")
    base = None
    if app_mib:
        base_file = root / "base-layer.tar"
        base = (*_base_layer(base_file, app_mib), base_file)
    for i in range(enclaves):
        name = f"e{i:03}"
        directory = root / "services" / name
        directory.mkdir(parents=True)
        layout = Store(directory / "app").init()
        layers: list[dict[str, object]] = []
        diff_ids: list[str] = []
        if base is not None:
            hex_, size, base_file = base
            os.link(base_file, layout.blobs / hex_)
            layers.append({"mediaType": mt.OCI_LAYER, "digest": f"sha256:{hex_}", "size": size})
            diff_ids.append(f"sha256:{hex_}")
        buf = __import__("io").BytesIO()
        own = write_layer([Entry.file("bin/app", f"#!/bin/sh\necho {name}\n".encode(), 0o755)], buf)
        layout.put_bytes(buf.getvalue(), own.digest)
        layers.append({"mediaType": own.media_type, "digest": str(own.digest), "size": own.size})
        diff_ids.append(str(own.diff_id))
        config = canonical_json({"architecture": "amd64", "os": "linux", "config": {"Cmd": ["/bin/app"]},
                                 "rootfs": {"type": "layers", "diff_ids": diff_ids}})
        config_digest = layout.put_bytes(config)
        manifest = canonical_json({"schemaVersion": 2, "mediaType": mt.OCI_MANIFEST,
                                   "config": {"mediaType": mt.OCI_CONFIG, "digest": str(config_digest),
                                              "size": len(config)}, "layers": layers})
        layout.tag("latest", Descriptor(mt.OCI_MANIFEST, layout.put_bytes(manifest), len(manifest)))
        (directory / "enclaver.yaml").write_text(
            f"version: v1\nname: {name}\ntarget: example.test/{name}:release\nsources:\n  app: oci:app:latest\n"
            f"ingress:\n  - listen_port: 8080\nbuild:\n  blobs: ../../blobs\n")
    if base is not None:
        base[2].unlink()  # the layouts keep their links


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
    ("  of which layer's uptodate: layer_present", "rules/layer.py", "layer_present"),
    ("  of which eif's uptodate: latest_intact", "rules/eif.py", "latest_intact"),
    ("  of which release's uptodate: release_present", "rules/release.py", "release_present"),
    ("resolve actions (uptodate [False]: every run)", "rules/resolve.py", "resolve_enclave"),
    ("  of which build_settings (manifest again)", "rules/common.py", "build_settings"),
    ("  of which an app's stamps (oci:, docker-archive:)", "oci/resolve.py", "_stamped"),
    ("    of which Stamps.get (stat every file)", "oci/stamps.py", "get"),
    ("  of which import_oci_layout (stamps differ)", "oci/transfer.py", "import_oci_layout"),
    ("  of which load_stored (manifest, config)", "oci/transfer.py", "load_stored"),
    ("  of which the blob set's stamps", "eif/blobs.py", "load_blobs_stamped"),
    ("    of which load_blobs (stamps differ)", "eif/blobs.py", "load_blobs"),
    ("  of which Stamps.save (written if changed)", "oci/stamps.py", "save"),
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


def print_table(times: dict[str, list[float]], rss: dict[str, int], enclaves: int, app_mib: int, note: str) -> None:
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["baseline"]
    print(f"no-op `doit build` of {enclaves} enclaves with {app_mib} MiB apps: {len(times['baseline'])} runs each, "
          f"alternating order; {os.cpu_count()} CPUs; {note}")
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
    goal = goal_s(enclaves)
    print(f"  goal: no-op build <= {goal:.2f} s (1 s + 10 ms per enclave): {'met' if worst <= goal else 'MISS'} "
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


def goal_s(enclaves: int) -> float:
    """1.5 s at 50 enclaves, 3 s at 200 (issue 20): one second, plus 10 ms per enclave."""
    return 1.0 + 0.01 * enclaves


def disk_needed(enclaves: int, app_mib: int) -> int:
    """Bytes the setup writes, about: the base layer twice (the layouts' hard links and the store's
    copy), one EIF per enclave (the app and odyn), the release images' gzip layers, odyn's images."""
    return int(((enclaves + 2) * (app_mib + 16) * 1.2 + 600) * (1 << 20))  # 50 x 256 MiB: 16.0 GiB measured


def disk_used(root: Path) -> int:
    seen: set[tuple[int, int]] = set()
    total = 0
    for directory, _, files in os.walk(root):
        for name in files:
            st = os.lstat(os.path.join(directory, name))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--enclaves", type=int, default=50)
    parser.add_argument("--app-mib", type=int, default=256,
                        help="each app image's size in MiB (its shared base layer; 0: a few bytes)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--profile", nargs="?", const="", metavar="FILE",
                        help="also profile one no-op build and print where its time goes (keep the .prof in FILE)")
    parser.add_argument("--no-bytecode-cache", action="store_true",
                        help="keep PYTHONDONTWRITEBYTECODE as it is (default: children cache bytecode in a temp dir)")
    parser.add_argument("--keep", metavar="DIR",
                        help="make the monorepo in DIR and keep it; a later run with the same --enclaves and "
                             "--app-mib reuses it (no setup)")
    parser.add_argument("--make-monorepo", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make_monorepo:
        make_monorepo(Path(args.make_monorepo), args.enclaves, args.app_mib)
        return 0
    os.environ["SOURCE_DATE_EPOCH"] = EPOCH
    os.environ.pop("ENC_CACHE_DIR", None)  # the cache/ beside the monorepo's dodo.py
    with contextlib.ExitStack() as stack:
        if args.keep:
            tmp = Path(args.keep).resolve()
            tmp.mkdir(parents=True, exist_ok=True)
        else:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="enclaver-noop-bench-")))
        root, report, made = tmp / "repo", tmp / "report.txt", tmp / "made.json"
        # doit runs in the monorepo, as a developer's would: `python -m` puts the working directory
        # first on sys.path, and here (this repository) that would import its enclaver_rules
        os.chdir(tmp)
        shape = {"enclaves": args.enclaves, "app_mib": args.app_mib}
        first_s: float | None = None
        if not (made.is_file() and json.loads(made.read_text()) == shape):
            if root.exists():
                shutil.rmtree(root)
            made.unlink(missing_ok=True)
            need, free = disk_needed(args.enclaves, args.app_mib), shutil.disk_usage(tmp).free
            if need > free - (2 << 30):
                raise SystemExit(f"{args.enclaves} enclaves of {args.app_mib} MiB need about {need / (1 << 30):.1f} "
                                 f"GiB in {tmp}, which has {free / (1 << 30):.1f} GiB free (2 GiB kept): "
                                 "use fewer enclaves or a smaller --app-mib")
            print(f"making a monorepo of {args.enclaves} enclaves with {args.app_mib} MiB apps "
                  f"(about {need / (1 << 30):.1f} GiB) ...", file=sys.stderr)
            # in a child: this process stays small, or the children it forks inherit its high-water mark
            subprocess.run([PY, str(Path(__file__).resolve()), "--make-monorepo", str(root), "--enclaves", str(args.enclaves),
                            "--app-mib", str(args.app_mib)], check=True)
            print("first `doit -n 2 build` (the odyn image, ~15 s, then every EIF) ...", file=sys.stderr)
            first_s = first_build(root)
            made.write_text(json.dumps(shape))
        bytecode = "as the environment says"
        if not args.no_bytecode_cache:
            # as in a developer's checkout: compiled modules are reused. Kept in the temp dir, so
            # nothing is written into the repository.
            os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
            os.environ["PYTHONPYCACHEPREFIX"] = str(tmp / "pycache")
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
        rules = subprocess.run([PY, "-c", "import enclaver_rules; print(enclaver_rules.__file__)"],
                               capture_output=True, text=True, check=True).stdout.strip()
        setup = f"setup build took {first_s:.0f} s" if first_s is not None else f"monorepo reused from {tmp}"
        print_table(times, rss, args.enclaves, args.app_mib,
                    f"bytecode {bytecode}; {setup}; {disk_used(root) / (1 << 30):.1f} GiB on disk; "
                    f"rule set {Path(rules).parent}")
        if args.profile is not None:
            prof = Path(args.profile) if args.profile else tmp / "noop.prof"
            run([PY, "-m", "cProfile", "-o", str(prof), *steps["doit build"][1:]])
            check_noop(report, args.enclaves)
            show_profile(prof, args.enclaves, statistics.median(times["doit build"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
