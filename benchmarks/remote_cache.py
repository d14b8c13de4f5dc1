"""What the shared remote cache saves: `doit eif:<name>` fetching the EIF from a registry, side by side with building it.

    .venv/bin/python benchmarks/remote_cache.py [--size-mib 256] [--repeat 3]
    .venv/bin/python benchmarks/remote_cache.py --quick           # smoke run: 32 MiB, 1 repeat
    .venv/bin/python benchmarks/remote_cache.py --template DIR    # set up once in DIR, reused by later runs

Setup, not timed: a temporary monorepo (this repository's dodo.py, a development blob set and
one enclave whose app image is SIZE MiB of random, incompressible bytes in a few files, in an
OCI layout beside its enclaver.yaml), its `cache/` after one `doit odyn_image runtime_image` (~35-90 s), a
local registry (distribution 2.8, `docker-registry`; README command (b)), and one first build
with ENC_REMOTE_CACHE set, which stores the entry there. Timed, in alternating order, `--repeat`
times each, `doit eif:<name>` in a fresh clone of that monorepo with no `cache/out/<name>`:
(a) without a remote cache, so the EIF is built; (b) with ENC_REMOTE_CACHE pointing at the
filled registry, so the EIF is fetched and checked as by default (digests, structure, CRC, PCR1
recomputed; PCR0 and PCR2 taken from the entry's record: rules/remote_cache.py, "Trust")
instead; (c) the same with ENC_REMOTE_CACHE_CHECK_PCRS=1, which recomputes PCR0 and PCR2 too
(two SHA-384 passes over the app ramdisk), for context. All also resolve the app and make the
enclave image first, the same work on each side; `doit layer:<name>` in another fresh clone times
that part, so the EIF step alone is shown too. Every run's output is checked ((b) and (c) said
"fetched from the remote cache", (a) did not, and all ended with the first build's EIF), so a broken run fails instead of looking fast. Printed:
medians, best times and the ratio fetched/built, with the EIF's size and MiB/s as context. The goal
(issue 20: fetching ≤ 0.5× building) is judged on the EIF step alone, the steps before it (which
both sides pay, and which a remote cache does not offer to skip) taken out.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _measure import wait_usage  # noqa: E402  (benchmarks/)

from services import start_registry  # type: ignore[import-not-found]  # noqa: E402  (tests/)

PY = sys.executable
NAME = "bench"
FILES = 4
FETCHED = "fetched from the remote cache"
STORED = "stored in the remote cache"


GOAL = 0.5  # fetching an EIF should cost at most half of building it


def make_monorepo(root: Path, size_mib: int) -> None:
    """dodo.py, cache/, blobs/ and services/NAME/ with enclaver.yaml and a SIZE MiB random app image."""
    from enclaver_rules.eif.blobs import write_dev_blobs
    from enclaver_rules.oci.layer import Entry
    from oci_helpers import make_layout  # type: ignore[import-not-found]  # tests/, as the pipeline test does

    root.mkdir(parents=True)
    shutil.copy(REPO / "dodo.py", root / "dodo.py")  # alone: no examples/, so its examples branch is skipped
    (root / "cache").mkdir()
    write_dev_blobs(root / "blobs", "x86_64")
    directory = root / "services" / NAME
    directory.mkdir(parents=True)
    per_file = (size_mib << 20) // FILES
    make_layout(str(directory / "app"), "latest",
                [[Entry.file("bin/app", b"#!/bin/sh\nexec sleep infinity\n", 0o755),
                  *(Entry.file(f"srv/data/part{i}", os.urandom(per_file)) for i in range(FILES))]],
                cmd=("/bin/app",))
    (directory / "enclaver.yaml").write_text(
        f"version: v1\nname: {NAME}\ntarget: example.test/{NAME}:release\nsources:\n  app: oci:app:latest\n"
        f"ingress:\n  - listen_port: 8080\nbuild:\n  blobs: ../../blobs\n")


def doit(root: Path, *args: str, remote: str | None = None, check_pcrs: bool = False) -> tuple[float, str]:
    """`doit ARGS` in `root` (a remote cache only if given, recomputing PCR0 and PCR2 if `check_pcrs`):
    its wall seconds and stdout; exits loudly if it fails. Its peak RSS (KiB, from wait4) goes to
    PEAK_RSS[args[0]], with " remote" (or " remote+pcrs") after it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENC_")}
    env["SOURCE_DATE_EPOCH"] = "1700000000"
    if remote:
        env["ENC_REMOTE_CACHE"] = remote
    if check_pcrs:
        env["ENC_REMOTE_CACHE_CHECK_PCRS"] = "1"
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen([PY, "-m", "doit", *args], cwd=root, env=env, stdout=out, stderr=err)
        usage = wait_usage(proc)
        elapsed = time.perf_counter() - start
        out.seek(0), err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    key = f"{args[0]}{' remote' if remote else ''}{'+pcrs' if check_pcrs else ''}"
    PEAK_RSS[key] = max(PEAK_RSS.get(key, 0), usage.peak_rss_kib)
    CPU.setdefault(key, []).append(usage.cpu)
    if proc.returncode != 0:
        raise SystemExit(f"doit {' '.join(args)} failed:\n{stdout[-3000:]}\n{stderr[-3000:]}")
    return elapsed, stdout


PEAK_RSS: dict[str, int] = {}
#: CPU seconds (user + system, from wait4) of each run, by the same key: with the wall time, how
#: much of a side's work ran in parallel threads (the registry's own CPU is not in it).
CPU: dict[str, list[float]] = {}


def clone(template: Path, where: Path) -> Path:
    """A fresh clone with the template's cache/ (odyn image, doit state) but no EIF; written out before timing."""
    shutil.rmtree(where, ignore_errors=True)
    shutil.copytree(template, where, symlinks=True)
    shutil.rmtree(where / "cache" / "out" / NAME, ignore_errors=True)
    os.sync()  # the copy's dirty pages are not flushed during the timed run
    return where


def record(root: Path) -> dict[str, Any]:
    """What must be the same on every machine: the key, the EIF's digest and size, the PCRs."""
    doc = json.loads((root / "cache" / "out" / NAME / "latest" / "eif.json").read_text())
    return {k: doc[k] for k in ("key", "eif", "measurements")}


def _no_image_rebuilt(out: str, how: str) -> None:
    """A timed run must find odyn and the runtime image up to date (as set up), or it times their build."""
    rebuilt = [t for t in ("odyn_image", "runtime_image") if f".  {t}" in out.splitlines()]
    if rebuilt:
        raise SystemExit(f"({how}) the clone rebuilt {', '.join(rebuilt)}: the set-up is stale\n{out[-2000:]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="smoke run: 32 MiB, 1 repeat")
    parser.add_argument("--template", metavar="DIR", help="keep the set-up monorepo (app image, odyn and runtime "
                        "images) in DIR and reuse it when it is there: later runs skip that setup")
    parser.add_argument("--make-monorepo", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.size_mib, args.repeat = 32, 1
    if args.make_monorepo:
        make_monorepo(Path(args.make_monorepo), args.size_mib)
        return 0
    with tempfile.TemporaryDirectory(prefix="enclaver-remote-cache-bench-") as tmp:
        base = Path(tmp)
        template = Path(args.template).resolve() if args.template else base / "template"
        ready = template / ".bench-ready"
        if ready.exists() and ready.read_text() == str(args.size_mib):
            # up to date with this checkout's sources, or every clone would rebuild odyn (~45 s) and
            # the EIF step would vanish in the noise of both sides' odyn builds
            print(f"reusing the monorepo in {template}; `doit odyn_image runtime_image` ...", file=sys.stderr)
            odyn_s, _ = doit(template, "odyn_image", "runtime_image")
        else:
            shutil.rmtree(template, ignore_errors=True)
            print(f"making a monorepo with a {args.size_mib} MiB app image ...", file=sys.stderr)
            # in a child: this process stays small (the random data and its layer are held in memory)
            subprocess.run([PY, __file__, "--make-monorepo", str(template), "--size-mib", str(args.size_mib)],
                           check=True)
            print("`doit odyn_image runtime_image` (~35-90 s) ...", file=sys.stderr)
            odyn_s, _ = doit(template, "odyn_image", "runtime_image")  # both images every resolve needs
            ready.write_text(str(args.size_mib))
        (base / "registry").mkdir()
        registry = start_registry(base / "registry")
        try:
            location = f"{next(registry).address}/enclaver-cache"
            print("first build, filling the remote cache ...", file=sys.stderr)
            first = clone(template, base / "first")
            first_s, out = doit(first, f"eif:{NAME}", remote=location)
            PEAK_RSS.pop(f"eif:{NAME} remote"), CPU.pop(f"eif:{NAME} remote")  # a build and an upload: not (b)
            if STORED not in out:
                raise SystemExit(f"the first build did not fill the remote cache:\n{out[-3000:]}")
            expected = record(first)
            shutil.rmtree(first)
            times: dict[str, list[float]] = {"built": [], "fetched": [], "checked": [], "layer": []}
            for round_ in range(args.repeat):
                for how in list(times) if round_ % 2 == 0 else reversed(times):
                    root = clone(template, base / how)
                    if how == "layer":  # context: the steps before the EIF, the same on both sides
                        elapsed, out = doit(root, f"layer:{NAME}")
                        times[how].append(elapsed)
                        _no_image_rebuilt(out, how)
                        shutil.rmtree(root)
                        continue
                    elapsed, out = doit(root, f"eif:{NAME}", remote=location if how != "built" else None,
                                        check_pcrs=how == "checked")
                    _no_image_rebuilt(out, how)
                    if (FETCHED in out) != (how != "built") or f".  eif:{NAME}" not in out.splitlines():
                        raise SystemExit(f"({how}) the EIF was not {'built' if how == 'built' else 'fetched'}:\n"
                                         f"{out[-3000:]}")
                    if record(root) != expected:
                        raise SystemExit(f"({how}) not the first build's EIF: {record(root)} != {expected}")
                    times[how].append(elapsed)
                    shutil.rmtree(root)
        finally:
            registry.close()
    eif_mib = expected["eif"]["size"] / (1 << 20)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"remote cache: `doit eif:{NAME}` in a fresh clone, app image {args.size_mib} MiB of random bytes "
          f"in {FILES} files; {args.repeat} runs each, alternating order; {os.cpu_count()} CPUs")
    print(f"  {'':46} {'median':>8} {'best':>8} {'ratio':>6} {'EIF MiB/s':>10} {'peak RSS':>10} {'CPU':>7}")
    for how, label, rss in (("built", "(a) doit eif: built locally, no remote cache", f"eif:{NAME}"),
                            ("fetched", "(b) doit eif: fetched from a local registry", f"eif:{NAME} remote"),
                            ("checked", "(c) the same, PCR0/PCR2 recomputed (opt-in)", f"eif:{NAME} remote+pcrs")):
        print(f"  {label:46} {med[how]:7.2f}s {min(times[how]):7.2f}s {med[how] / med['built']:5.2f}x "
              f"{eif_mib / med[how]:10.1f} {PEAK_RSS[rss] / 1024:6.1f} MiB {statistics.median(CPU[rss]):6.2f}s")
    print(f"  {'context: doit layer (resolve + enclave image)':46} {med['layer']:7.2f}s {min(times['layer']):7.2f}s"
          f"{'':29} {statistics.median(CPU[f'layer:{NAME}']):6.2f}s")
    print(f"  ratio = median / (a) median; EIF {eif_mib:.1f} MiB; MiB/s = EIF size / median; "
          "CPU = median user + system seconds of the doit process")
    built, fetched = med["built"] - med["layer"], med["fetched"] - med["layer"]
    print(f"  fetched/built: {med['fetched'] / med['built']:.2f}; without the steps before the EIF (both sides "
          f"pay them): {fetched:.2f} s / {built:.2f} s = {fetched / built if built > 0 else float('nan'):.2f}")
    checked = med["checked"] - med["layer"]
    print(f"  (c) PCR0 and PCR2 recomputed too (ENC_REMOTE_CACHE_CHECK_PCRS=1): {checked:.2f} s / {built:.2f} s = "
          f"{checked / built if built > 0 else float('nan'):.2f} (context, not the goal)")
    ratio = fetched / built if built > 0 else float("inf")
    print(f"  goal (issue 20): the EIF step fetched/built <= {GOAL}: {'met' if ratio <= GOAL else 'MISS'} ({ratio:.2f})")
    print(f"  setup (not timed): odyn and runtime images {odyn_s:.1f} s{' (--template)' if args.template else ''}, "
          f"first build + upload {first_s:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
