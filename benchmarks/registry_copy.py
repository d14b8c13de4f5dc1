"""Copy a >= 200 MB multi-layer image registry → registry with enclaver, side by side with skopeo.

    .venv/bin/python benchmarks/registry_copy.py [--size-mb 220] [--layers 4] [--rounds 3]

Local registries (distribution 2.8): one source, and a fresh destination per tool and round, so no
cross-repository mount or blob cache can flatter either tool; enclaver gets a fresh store each time.
Three ways, in an order that rotates each round:

* (a) one `enclaver image push SRC DST` (SRC the source registry's reference), the command that
  stands beside `skopeo copy`;
* (b) `enclaver image pull SRC` then `enclaver image push SRC DST` (two processes; the store
  between them);
* `skopeo copy docker://SRC docker://DST`, the yardstick for (a);
* `skopeo copy docker://SRC oci:DIR` then `skopeo copy oci:DIR docker://DST`, skopeo's own pull
  then push (the local copy between them), the yardstick for (b): both write every byte to the
  disk and read it back, which one registry-to-registry copy never does. (b)'s ratio to the one
  copy is printed beside it as context.

Printed: median wall time and peak RSS (wait4, max over the runs; for (b) over both processes) of
each, the ratios to skopeo, and the ratios "without start-ups": each side's wall time less its own
process start-up (`enclaver --version` per enclaver process, `skopeo --version` for skopeo, both
timed the same way), so neither side is charged for an interpreter the other does not start. The
layers are random bytes, so compression cannot help anyone. Needs docker-registry and skopeo.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from _measure import run  # noqa: E402

from enclaver_rules.oci.layer import Entry  # noqa: E402
from oci_helpers import make_layout  # noqa: E402
from services import start_registry  # noqa: E402

ENCLAVER = [sys.executable, "-m", "enclaver_rules.cli"]
SKOPEO = ["skopeo", "copy", "-q", "--src-tls-verify=false", "--dest-tls-verify=false"]
GOAL_RATIO = 1.0
GOAL_RSS_MIB = 128


@contextlib.contextmanager
def fresh_registry(path: Path) -> Iterator[str]:
    path.mkdir()
    gen = start_registry(path)
    try:
        yield next(gen).address
    finally:
        gen.close()
        shutil.rmtree(path, ignore_errors=True)


class Side:
    """One way of copying: its wall times, peak RSS (KiB) and how many processes it starts."""

    def __init__(self, label: str, processes: int, startup: float) -> None:
        self.label, self.processes, self.startup = label, processes, startup
        self.times: list[float] = []
        self.rss = 0

    def add(self, runs: list[tuple[float, int]]) -> None:
        self.times.append(sum(t for t, _ in runs))
        self.rss = max([self.rss, *(r for _, r in runs)])

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def net(self) -> float:
        return self.median - self.processes * self.startup


def _startup(cmd: list[str]) -> float:
    run(cmd)  # warm the page cache
    return statistics.median(run(cmd)[0] for _ in range(5))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mb", type=int, default=220)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--make-layout", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make_layout:
        per_layer = args.size_mb * (1 << 20) // args.layers
        make_layout(args.make_layout, "v1", [[Entry.file(f"layer{i}/data", os.urandom(per_layer))]
                                             for i in range(args.layers)])
        return 0
    for tool in ("docker-registry", "skopeo"):
        if not shutil.which(tool) and not Path(f"/usr/bin/{tool}").exists():
            raise SystemExit(f"{tool} is missing: run README command (b) first")

    ours_startup = _startup([*ENCLAVER, "--version"])
    skopeo_startup = _startup(["skopeo", "--version"])
    one = Side("(a) enclaver image push SRC DST", 1, ours_startup)
    two = Side("(b) enclaver image pull + push", 2, ours_startup)
    skopeo = Side("skopeo copy", 1, skopeo_startup)
    skopeo_two = Side("skopeo copy to oci: + copy to DST", 2, skopeo_startup)
    with tempfile.TemporaryDirectory(prefix="enclaver-bench-") as tmp:
        base = Path(tmp)
        (base / "src-registry").mkdir()
        src_gen = start_registry(base / "src-registry")
        src = next(src_gen)
        try:
            print(f"building a {args.size_mb} MB image of {args.layers} random layers ...", file=sys.stderr)
            # in a child process: this one must stay small, or forked children inherit its high-water mark
            subprocess.run([sys.executable, __file__, "--make-layout", str(base / "layout"), "--size-mb",
                            str(args.size_mb), "--layers", str(args.layers)], check=True)
            source = f"{src.address}/bench/app:v1"
            subprocess.run([*ENCLAVER, "image", "push", f"oci:{base / 'layout'}:v1", source, "--cache-dir",
                            str(base / "seed-cache"), "-q"], check=True)
            shutil.rmtree(base / "seed-cache")

            # A fresh destination registry per way and round: skopeo's blob-info cache (for root,
            # /var/lib/containers/cache) would otherwise mount blobs it saw there in earlier rounds.
            def direct(round_: int) -> None:
                cache = base / f"cache-a{round_}"
                with fresh_registry(base / f"a-{round_}") as dst:
                    one.add([run([*ENCLAVER, "image", "push", source, f"{dst}/ours/app:v1", "--cache-dir",
                                  str(cache), "-q"])])
                shutil.rmtree(cache, ignore_errors=True)

            def pull_push(round_: int) -> None:
                cache = base / f"cache-b{round_}"
                with fresh_registry(base / f"b-{round_}") as dst:
                    pulled = run([*ENCLAVER, "image", "pull", source, "--cache-dir", str(cache), "-q"])
                    pushed = run([*ENCLAVER, "image", "push", source, f"{dst}/ours/app:v1", "--cache-dir",
                                  str(cache), "-q"])
                    two.add([pulled, pushed])
                shutil.rmtree(cache, ignore_errors=True)

            def copy(round_: int) -> None:
                with fresh_registry(base / f"s-{round_}") as dst:
                    skopeo.add([run([*SKOPEO, f"docker://{source}", f"docker://{dst}/skopeo/app:v1"])])

            def copy_two(round_: int) -> None:
                layout = f"oci:{base / f'skopeo-layout-{round_}'}:v1"
                with fresh_registry(base / f"t-{round_}") as dst:
                    pulled = run([*SKOPEO, f"docker://{source}", layout])
                    pushed = run([*SKOPEO, layout, f"docker://{dst}/skopeo/app:v1"])
                    skopeo_two.add([pulled, pushed])
                shutil.rmtree(base / f"skopeo-layout-{round_}", ignore_errors=True)

            steps: list[Callable[[int], None]] = [direct, pull_push, copy, copy_two]
            for round_ in range(args.rounds):
                for step in steps[round_ % 4:] + steps[:round_ % 4]:
                    step(round_)
        finally:
            src_gen.close()

    print(f"image: {args.size_mb} MB in {args.layers} layers; {args.rounds} rounds, medians; "
          f"start-up: enclaver {ours_startup:.2f} s, skopeo {skopeo_startup:.2f} s")
    for side in (one, two, skopeo, skopeo_two):
        print(f"  {side.label:<34} {side.median:6.2f} s  (without start-ups {side.net:5.2f} s)   "
              f"peak RSS {side.rss / 1024:6.1f} MiB")
    for side, against in ((one, skopeo), (two, skopeo_two)):
        ratio, net = side.median / against.median, side.net / against.net
        verdict = "met" if ratio <= GOAL_RATIO and side.rss / 1024 <= GOAL_RSS_MIB else "MISS"
        print(f"  {side.label[:3]} ratio to {against.label} {ratio:.2f}, without start-ups {net:.2f}; "
              f"goal <= {GOAL_RATIO} and RSS <= {GOAL_RSS_MIB} MiB: {verdict}")
    print(f"  (b) ratio to one skopeo copy (context) {two.median / skopeo.median:.2f}, "
          f"without start-ups {two.net / skopeo.net:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
