"""EIF build from a 1 GiB synthetic image against the floor: the hashing the build must do, run in parallel.

    .venv/bin/python benchmarks/eif_build.py [--size-mb 1024] [--layers 4] [--rounds 3]

The floor is what `build_eif` cannot avoid computing over an image's bytes, done as well as this
machine allows, in one process, over the same bytes: every layer blob's SHA-256 (the store's digest,
checked before the EIF is kept), two SHA-384 chains over the customer ramdisk (PCR0 continues from
the kernel, PCR2 starts fresh: both see every byte) and the EIF's CRC32. One reader fills a ring of
preallocated buffers (`readinto`) and four threads hash each buffer in place (hashlib and zlib
release the GIL), so on N cores the floor is about max(one SHA-384 pass, all four / N). The EIF's
own SHA-256, which the `eif` rule records, is computed after `build_eif` returns and is not part of
this build or this floor. One plain SHA-384 pass over the same bytes is printed as context (the old
yardstick). The build runs twice per round, writing the EIF to tmpfs (the builder's own cost) and
to the disk (adds the disk's write speed and the fsync; a plain write of the same size, fsynced like
the EIF, is printed for context). Everything runs as child processes in the same session, in
alternating order; printed are medians, ratios and peak RSS (from wait4) beside each time. The image
is random data (incompressible) in uncompressed layers, written to a store in a temporary directory;
the blob set is the development one.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _measure import run  # noqa: E402

FILE_MB = 16
GOAL_RATIO = 1.2
GOAL_RSS_MIB = 256

HASH = """
import hashlib, sys
h = hashlib.sha384()
for path in sys.argv[1:]:
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
print(h.hexdigest())
"""

FLOOR = """
import hashlib, queue, sys, threading, zlib
CHUNK, DEPTH = 8 << 20, 4
buffers = [bytearray(CHUNK) for _ in range(DEPTH)]
free: queue.Queue = queue.Queue()
for i in range(DEPTH):
    free.put(i)
pcr0, pcr2, crc = hashlib.sha384(), hashlib.sha384(), [0]
left, lock = [0] * DEPTH, threading.Lock()

def crc32(view):
    crc[0] = zlib.crc32(view, crc[0])

def worker(q, kind):
    while (item := q.get()) is not None:
        i, n, blob = item
        view = memoryview(buffers[i])[:n]
        if kind == "sha256":
            blob.update(view)
        elif kind == "crc32":
            crc32(view)
        else:
            kind.update(view)
        with lock:
            left[i] -= 1
            if not left[i]:
                free.put(i)

queues = [queue.Queue() for _ in range(4)]
threads = [threading.Thread(target=worker, args=(q, k)) for q, k in zip(queues, ("sha256", pcr0, pcr2, "crc32"))]
for t in threads:
    t.start()
digests = []
for path in sys.argv[1:]:
    blob = hashlib.sha256()
    digests.append(blob)
    with open(path, "rb", buffering=0) as f:
        while True:
            i = free.get()
            n = f.readinto(buffers[i])
            if not n:
                free.put(i)
                break
            left[i] = len(queues)
            for q in queues:
                q.put((i, n, blob))
for q in queues:
    q.put(None)
for t in threads:
    t.join()
print(pcr0.hexdigest(), pcr2.hexdigest(), crc[0], [d.hexdigest() for d in digests])
"""

WRITE = """
import os, sys
block = bytes(1 << 20)
with open(sys.argv[1], "wb") as f:
    for _ in range(int(sys.argv[2])):
        f.write(block)
    f.flush()
    os.fsync(f.fileno())
"""

BUILD = """
import sys
from enclaver_rules.eif.blobs import load_blobs
from enclaver_rules.eif.build import build_eif
from enclaver_rules.oci.store import Store
from enclaver_rules.oci.transfer import load_stored
store = Store(sys.argv[1])
image = load_stored(store, "bench", store.resolve("bench").digest)
result = build_eif(image, store, load_blobs(sys.argv[2], "x86_64"), sys.argv[3])
print(result.measurements.pcr0)
"""


class RandomReader:
    def __init__(self, size: int) -> None:
        self.left = size

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        self.left -= n
        return os.urandom(n)


def make_image(root: Path, size_mb: int, layers: int) -> list[Path]:
    """Uncompressed random layers into a store, tagged `bench`; returns the layer blob paths."""
    sys.path.insert(0, str(REPO))
    from enclaver_rules.oci import mediatypes as mt
    from enclaver_rules.oci.model import Descriptor
    from enclaver_rules.oci.mutate import canonical_json
    from enclaver_rules.oci.store import Store

    store = Store(root / "store").init()
    per_layer = size_mb // layers
    descriptors, paths = [], []
    for i in range(layers):
        tmp = root / f"layer{i}.tar"
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            for j in range(per_layer // FILE_MB):
                info = tarfile.TarInfo(f"data/layer{i}/file{j:03}")
                info.size, info.mode = FILE_MB << 20, 0o644
                tar.addfile(info, RandomReader(info.size))  # type: ignore[arg-type]
        with open(tmp, "rb") as f:
            digest = store.put_stream(f)
        tmp.unlink()
        size = store.path(digest).stat().st_size
        descriptors.append({"mediaType": mt.OCI_LAYER, "digest": str(digest), "size": size})
        paths.append(store.path(digest))
    config = canonical_json({"architecture": "amd64", "os": "linux", "config": {"Cmd": ["/bin/app"]},
                             "rootfs": {"type": "layers", "diff_ids": [d["digest"] for d in descriptors]}})
    config_digest = store.put_bytes(config)
    manifest = canonical_json({"schemaVersion": 2, "mediaType": mt.OCI_MANIFEST, "config": {
        "mediaType": mt.OCI_CONFIG, "digest": str(config_digest), "size": len(config)}, "layers": descriptors})
    store.tag("bench", Descriptor(mt.OCI_MANIFEST, store.put_bytes(manifest), len(manifest)))
    return paths


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--make-image", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make_image:
        make_image(Path(args.make_image), args.size_mb, args.layers)
        return 0
    with tempfile.TemporaryDirectory(prefix="enclaver-eif-bench-") as tmp:
        root = Path(tmp)
        print(f"building a {args.size_mb} MiB image of {args.layers} random layers ...", file=sys.stderr)
        # in a child: this process must stay small, or forked children inherit its high-water mark
        subprocess.run([sys.executable, __file__, "--make-image", str(root), "--size-mb", str(args.size_mb),
                        "--layers", str(args.layers)], check=True)
        subprocess.run([sys.executable, "-m", "enclaver_rules.cli", "blobs", "dev", "-o", str(root / "blobs"), "-q"],
                       check=True, stdout=subprocess.DEVNULL)
        layer_files = sorted(str(p) for p in (root / "store" / "blobs" / "sha256").iterdir()
                             if p.stat().st_size > 1 << 20)
        shm = Path(tempfile.mkdtemp(prefix="enclaver-eif-bench-", dir="/dev/shm")) if Path("/dev/shm").is_dir() else root
        times: dict[str, list[float]] = {"tmpfs": [], "disk": [], "floor": [], "sha384": [], "write": []}
        peaks: dict[str, int] = dict.fromkeys(times, 0)
        try:
            for round_ in range(args.rounds):
                steps = list(times) if round_ % 2 == 0 else list(reversed(times))
                for step in steps:
                    if step in ("tmpfs", "disk"):
                        out = (shm if step == "tmpfs" else root) / "app.eif"
                        elapsed, peak = run([sys.executable, "-c", BUILD, str(root / "store"), str(root / "blobs"),
                                             str(out)])
                        out.unlink()
                    elif step in ("floor", "sha384"):
                        elapsed, peak = run([sys.executable, "-c", FLOOR if step == "floor" else HASH, *layer_files])
                    else:
                        elapsed, peak = run([sys.executable, "-c", WRITE, str(root / "zeros"), str(args.size_mb)])
                        (root / "zeros").unlink()
                    times[step].append(elapsed)
                    peaks[step] = max(peaks[step], peak)
        finally:
            shutil.rmtree(shm, ignore_errors=True) if shm != root else None
    m = {k: statistics.median(v) for k, v in times.items()}

    def line(label: str, step: str, extra: str = "") -> None:
        print(f"  {label:<58} {m[step]:6.2f} s  peak RSS {peaks[step] / 1024:6.1f} MiB{extra}")

    floor, one = m["floor"], m["sha384"]
    verdict = "met" if max(m["tmpfs"], m["disk"]) / floor <= GOAL_RATIO and max(peaks["tmpfs"], peaks["disk"]) \
        <= GOAL_RSS_MIB * 1024 else "MISS"
    print(f"image: {args.size_mb} MiB in {args.layers} layers of {FILE_MB} MiB files; {args.rounds} rounds, medians")
    line("floor: sha256 + 2 x sha384 + crc32, parallel threads", "floor", f"   ({floor / one:.2f} x one sha384 pass)")
    line("one hashlib.sha384 pass over the same bytes (context)", "sha384")
    for where in ("tmpfs", "disk"):
        line(f"enclaver eif build, EIF on {where}", where,
             f"   ratio {m[where] / floor:.2f} x floor  ({m[where] / one:.2f} x one sha384 pass)")
    line(f"writing {args.size_mb} MiB of zeros to the same disk (context)", "write")
    print(f"  goal: build <= {GOAL_RATIO} x floor on tmpfs and on disk, RSS <= {GOAL_RSS_MIB} MiB: {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
