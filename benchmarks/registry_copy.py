"""Copy a >= 200 MB multi-layer image registry → store → registry with enclaver, side by side with skopeo.

    .venv/bin/python benchmarks/registry_copy.py [--size-mb 220] [--layers 4] [--rounds 3]

Local registries (distribution 2.8): one source, and a fresh destination per tool and round, so no
cross-repository mount or blob cache can flatter either tool; enclaver gets a fresh store. Rounds
alternate the tools' order. Printed: median wall time of each, the ratio enclaver/skopeo, and
enclaver's peak RSS (max over its pull and push processes, from wait4). The layers are random
bytes, so compression cannot help anyone. Needs docker-registry and skopeo (README command (b)).
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
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from _measure import run  # noqa: E402

from enclaver_rules.oci.layer import Entry  # noqa: E402
from oci_helpers import make_layout  # noqa: E402
from services import start_registry  # noqa: E402

ENCLAVER = [sys.executable, "-m", "enclaver_rules.cli"]


@contextlib.contextmanager
def fresh_registry(path: Path) -> Iterator[str]:
    path.mkdir()
    gen = start_registry(path)
    try:
        yield next(gen).address
    finally:
        gen.close()
        shutil.rmtree(path, ignore_errors=True)


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
            ours: list[float] = []
            pulls: list[float] = []
            pushes: list[float] = []
            theirs: list[float] = []
            startup = statistics.median(run([*ENCLAVER, "--version"])[0] for _ in range(3))
            rss = 0
            for round_ in range(args.rounds):
                # A fresh destination registry per tool and round: skopeo's blob-info cache (for root,
                # /var/lib/containers/cache) would otherwise mount blobs it saw there in earlier rounds.
                def enclaver(round_: int) -> None:
                    nonlocal rss
                    cache = base / f"cache-{round_}"
                    with fresh_registry(base / f"ours-{round_}") as dst:
                        t1, r1 = run([*ENCLAVER, "image", "pull", source, "--cache-dir", str(cache), "-q"])
                        t2, r2 = run([*ENCLAVER, "image", "push", source, f"{dst}/ours/app:v1",
                                      "--cache-dir", str(cache), "-q"])
                    ours.append(t1 + t2)
                    pulls.append(t1)
                    pushes.append(t2)
                    rss = max(rss, r1, r2)
                    shutil.rmtree(cache)

                def skopeo(round_: int) -> None:
                    with fresh_registry(base / f"skopeo-{round_}") as dst:
                        elapsed, _ = run(["skopeo", "copy", "-q", "--src-tls-verify=false", "--dest-tls-verify=false",
                                          f"docker://{source}", f"docker://{dst}/skopeo/app:v1"])
                    theirs.append(elapsed)

                for step in ((enclaver, skopeo) if round_ % 2 == 0 else (skopeo, enclaver)):
                    step(round_)
        finally:
            src_gen.close()

    ours_s, theirs_s = statistics.median(ours), statistics.median(theirs)
    print(f"image: {args.size_mb} MB in {args.layers} layers; {args.rounds} rounds, medians")
    print(f"  enclaver pull + push (registry → store → registry): {ours_s:6.2f} s   peak RSS {rss / 1024:6.1f} MiB")
    print(f"    pull {statistics.median(pulls):.2f} s + push {statistics.median(pushes):.2f} s; "
          f"of which process start-up {startup:.2f} s each")
    print(f"  skopeo copy (registry → registry):                   {theirs_s:6.2f} s")
    print(f"  ratio enclaver/skopeo: {ours_s / theirs_s:.2f}   (goal <= 1.0; RSS goal <= 128 MiB)")
    print(f"  ratio without the two start-ups: {(ours_s - 2 * startup) / theirs_s:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
