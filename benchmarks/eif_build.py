"""EIF build from a 1 GiB synthetic image, side by side with one plain SHA-384 pass over the same bytes.

    .venv/bin/python benchmarks/eif_build.py [--size-mb 1024] [--layers 4] [--rounds 3]

The floor: every byte of the image must be hashed at least once, so `hashlib.sha384` over the
layer bytes is what an EIF build cannot beat. The build runs twice per round, writing the EIF to
tmpfs (the builder's own cost) and to the disk (adds the disk's write speed; a plain write of the
same size, fsynced like the EIF, is printed for context). Everything runs as child processes in
the same session, in alternating order; printed are medians, ratios and enclaver's peak RSS
(from wait4). The image is random data (incompressible) in uncompressed layers, written to a
store in a temporary directory; the blob set is the development one.
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

HASH = """
import hashlib, sys
h = hashlib.sha384()
for path in sys.argv[1:]:
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
print(h.hexdigest())
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
        times: dict[str, list[float]] = {"tmpfs": [], "disk": [], "sha384": [], "write": []}
        rss = 0
        try:
            for round_ in range(args.rounds):
                steps = list(times) if round_ % 2 == 0 else list(reversed(times))
                for step in steps:
                    if step in ("tmpfs", "disk"):
                        out = (shm if step == "tmpfs" else root) / "app.eif"
                        elapsed, peak = run([sys.executable, "-c", BUILD, str(root / "store"), str(root / "blobs"),
                                             str(out)])
                        rss = max(rss, peak)
                        out.unlink()
                    elif step == "sha384":
                        elapsed = run([sys.executable, "-c", HASH, *layer_files])[0]
                    else:
                        elapsed = run([sys.executable, "-c", WRITE, str(root / "zeros"), str(args.size_mb)])[0]
                        (root / "zeros").unlink()
                    times[step].append(elapsed)
        finally:
            shutil.rmtree(shm, ignore_errors=True) if shm != root else None
    m = {k: statistics.median(v) for k, v in times.items()}
    print(f"image: {args.size_mb} MiB in {args.layers} layers of {FILE_MB} MiB files; {args.rounds} rounds, medians")
    print(f"  hashlib.sha384 over the image's bytes (the floor):  {m['sha384']:6.2f} s")
    print(f"  enclaver eif build, EIF on tmpfs:                    {m['tmpfs']:6.2f} s   ratio {m['tmpfs'] / m['sha384']:.2f}")
    print(f"  enclaver eif build, EIF on disk:                     {m['disk']:6.2f} s   ratio {m['disk'] / m['sha384']:.2f}")
    print(f"  writing {args.size_mb} MiB of zeros to the same disk (context):  {m['write']:6.2f} s")
    print(f"  peak RSS of the build: {rss / 1024:.1f} MiB   (goals: ratio <= 1.3, RSS <= 256 MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
