"""Task `eif:<name>`: the EIF and its measurements, in `out/<name>/<key>/`.

The key covers the enclave image's digest, the blob set's digest, the signing certificate, the
EIF's image name (the manifest's `target`, recorded in its metadata), SOURCE_DATE_EPOCH and
enclaver's version. A complete entry for the key is a cache hit (its EIF re-hashed first, so a
tampered entry is rebuilt, not used); else, with a remote cache, the entry is fetched and checked
(`remote_cache` says what is checked and what cannot be); else the EIF is built. A build happens
in `.tmp-<key>-<pid>/` and is renamed into place, so `kill -9` at any point leaves either nothing
or a complete entry; `latest` then points at it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from enclaver_rules.errors import OperationFailed
from enclaver_rules.oci.digest import Digest
from enclaver_rules.oci.store import Staging, Store, atomic_write, is_stale
from enclaver_rules.rules.common import (
    EIF_FILE,
    EIF_RECORD,
    LATEST,
    LAYER,
    MEASUREMENTS,
    RESOLVED,
    out_dir,
    point_latest,
    progress,
    reported,
    step_key,
)
from enclaver_rules.rules.layer import read_resolved
from enclaver_rules.rules.remote_cache import OutputFile, Poisoned, RemoteCache

if TYPE_CHECKING:
    from enclaver_rules.eif.stream import StreamedEif

#: Facts of this copy only, never in a remote entry: the EIF's size, mtime, inode and ctime (for the
#: quick up-to-date check) and where the entry came from ("built", or "remote cache <location>").
LOCAL = "local.json"
PCR_VALUE = re.compile(r"[0-9a-f]{96}")  # a SHA-384, as nitro-cli prints it
OUTPUTS = (OutputFile(EIF_RECORD, "application/vnd.enclaver.eif-record.v1+json"),
           OutputFile(MEASUREMENTS, "application/vnd.enclaver.measurements.v1+json"),
           OutputFile(EIF_FILE, "application/vnd.enclaver.eif.v1"))


def eif_key(resolved: dict[str, Any], layer: dict[str, Any]) -> str:
    settings = resolved["settings"]
    return step_key("eif", {
        "enclave_image": layer["enclave_image"], "blobs": resolved["blobs"]["digest"],
        "signing": settings["signing"]["certificate_sha256"] if settings["signing"] else None,
        "image_name": settings["target"], "epoch": settings["epoch"], "backend": settings["backend"],
        "nitro_cli": (settings.get("nitro_cli") or {}).get("id"),
    })


def _stamp(dest: Path) -> list[int]:
    """The EIF's size, mtime, inode and ctime: bytes rewritten in place with the size and mtime put
    back still move ctime, which no system call sets (see `enclaver_rules.oci.stamps`)."""
    st = (dest / EIF_FILE).stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]


def intact(dest: Path, *, quick: bool = False) -> bool:
    """A complete entry whose EIF still has the digest it was recorded with. `quick` (doit's
    up-to-date check, every run) compares the EIF's stamp instead of re-hashing hundreds of MiB; a
    real build re-hashes before it reuses an entry, and the release step before it packs the EIF."""
    try:
        record = json.loads((dest / EIF_RECORD).read_text())
        if not (dest / MEASUREMENTS).is_file():
            return False
        if quick:
            return bool(json.loads((dest / LOCAL).read_text())["stat"] == _stamp(dest))
        return bool(Digest.of_file(dest / EIF_FILE).hex == record["eif"]["sha256"])
    except (OSError, ValueError, KeyError):
        return False


def _restamp(dest: Path, stamp: list[int]) -> None:
    """Record the stamp of an EIF just re-hashed and found intact, when it differs from the recorded
    one (an entry copied or restored, or stamped by an older enclaver without ctime), so the next
    up-to-date check is quick again."""
    try:
        local = json.loads((dest / LOCAL).read_text())
    except (OSError, ValueError):
        local = {"origin": "built"}
    if not isinstance(local, dict) or local.get("stat") == stamp:
        return
    atomic_write(dest / LOCAL, json.dumps({**local, "stat": stamp}).encode())


def _measurements_json(pcrs: dict[str, str]) -> bytes:
    return json.dumps({"Measurements": {"HashAlgorithm": "Sha384 { ... }", **pcrs}}, indent=2).encode() + b"\n"


def _build(work: Path, cache_dir: str, name: str, resolved: dict[str, Any], layer: dict[str, Any]) -> dict[str, str]:
    from enclaver_rules.eif.blobs import load_blobs
    from enclaver_rules.eif.build import build_eif
    from enclaver_rules.eif.sign import Signer
    from enclaver_rules.oci.transfer import load_stored

    settings = resolved["settings"]
    store = Store(cache_dir)
    image = load_stored(store, layer["tag"], Digest.parse(layer["enclave_image"]))
    blobs = load_blobs(resolved["blobs"]["path"], resolved["blobs"]["arch"], Digest.parse(resolved["blobs"]["digest"]))
    signing = settings["signing"]
    if settings["backend"] == "nitro-cli":
        return _build_with_nitro_cli(work, store, image, settings)
    signer = Signer.load(signing["certificate"], signing["key"]) if signing else None
    with progress(f"eif {name}", None) as advance:
        result = build_eif(image, store, blobs, work / EIF_FILE, epoch=settings["epoch"],
                           image_name=settings["target"], signer=signer, workdir=str(work), progress=advance)
    return _pcrs(result.measurements.to_json())


def _pcrs(measurements: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in measurements.items() if k.startswith("PCR")}


def _build_with_nitro_cli(work: Path, store: Store, image: Any, settings: dict[str, Any]) -> dict[str, str]:
    """AWS's nitro-cli in a container (upstream's way), with its own kernel blobs. What it prints is
    checked against the PCRs recomputed from the EIF it wrote: a build tool's claim is not a measurement."""
    from enclaver_rules.eif import nitro_cli
    from enclaver_rules.eif.describe import describe

    signing = settings["signing"]
    files = (Path(signing["certificate"]), Path(signing["key"])) if signing else None
    run = nitro_cli.build_stored(image, store, work / EIF_FILE, nitro_cli_image=settings["nitro_cli"]["image"],
                                 signing=files, workdir=str(work))
    printed = _pcrs(run.measurements.to_json())
    try:
        measured = _pcrs(describe(str(work / EIF_FILE))["Measurements"])
    except (OperationFailed, ValueError, OSError) as e:
        raise OperationFailed(f"nitro-cli wrote an EIF that cannot be read: {e}",
                              fix="check the nitro-cli image (build.nitro_cli_image)") from None
    if printed != measured:
        raise OperationFailed(f"nitro-cli printed PCRs {printed} but its EIF measures {measured}",
                              fix="do not use this nitro-cli image; report it")
    return measured


def check_fetched(work: Path, key: str, resolved: dict[str, Any], layer: dict[str, Any],
                  digests: dict[str, Digest], streamed: StreamedEif | None = None) -> None:
    """Refuse a fetched entry unless it is what a build of these inputs would have recorded, as far
    as that can be known without rebuilding (see `remote_cache`). `digests` are the files' digests,
    verified as they were downloaded. `streamed`: the EIF as read while it downloaded (its PCRs,
    CRC, signature and metadata, computed beside its SHA-256), used instead of reading the file
    again only when it describes exactly this file: landed under the EIF's verified digest, same
    inode and size, unchanged since (`StreamedEif.describes`); otherwise the file is read. PCR0 and
    PCR2 are compared with the record only when they were recomputed (a stream made with
    `pcrs=True`, or the file read again); otherwise they are taken from it (remote_cache.py: Trust),
    checked for form, for agreement between the two records and against the signature. Raises
    Poisoned."""
    from enclaver_rules.eif.blobs import load_blobs
    from enclaver_rules.eif.build import boot_pcr1
    from enclaver_rules.eif.describe import describe
    from enclaver_rules.eif.sign import Signer

    def refuse(problem: str) -> Poisoned:
        return Poisoned(f"remote cache entry eif-{key}: {problem}",
                        fix="not used; it is replaced by this build when the cache is writable")

    try:
        record = json.loads((work / EIF_RECORD).read_text())
        claimed = json.loads((work / MEASUREMENTS).read_text())["Measurements"]
        claimed = {k: v for k, v in claimed.items() if k.startswith("PCR")}
        recorded_digest = record["eif"]["sha256"]
        inputs = record.get("inputs", {})
        got = {"key": record.get("key"), "enclave_image": record.get("enclave_image"), "target": record.get("target"),
               "epoch": record.get("epoch"), "development": record.get("development"),
               **{f"{k} digest": inputs.get(k, {}).get("digest") for k in ("app", "odyn", "blobs")}}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise refuse(f"its records are not readable ({e})") from None
    # everything the release image's labels will repeat from the record, not only what the key covers
    expected = {"key": key, "enclave_image": layer["enclave_image"], "target": resolved["settings"]["target"],
                "epoch": resolved["settings"]["epoch"], "development": resolved["blobs"]["development"],
                **{f"{k} digest": resolved[k]["digest"] for k in ("app", "odyn", "blobs")}}
    for field, value in expected.items():
        if got[field] != value:
            raise refuse(f"it records {field} {got[field]!r}, this build has {value!r}")
    if digests[EIF_FILE] != Digest("sha256", recorded_digest):
        raise refuse("the EIF's digest is not the one its record gives")
    try:
        if streamed is not None and streamed.describes(digests[EIF_FILE], (work / EIF_FILE).stat()):
            described = streamed.describe()
        else:
            described = describe(str(work / EIF_FILE))
    except (OperationFailed, ValueError, OSError) as e:
        raise refuse(f"the EIF cannot be read: {e}") from None
    actual = {k: v for k, v in described["Measurements"].items() if k.startswith("PCR")}
    if not described.get("CheckCRC"):
        raise refuse("the EIF's CRC does not match its contents")
    if record.get("measurements") != claimed:
        raise refuse(f"its two records ({EIF_RECORD}, {MEASUREMENTS}) give different PCRs")
    if set(claimed) != set(actual) | {"PCR0", "PCR2"} or \
            not all(isinstance(v, str) and PCR_VALUE.fullmatch(v) for v in claimed.values()):
        raise refuse(f"its PCRs are not PCR0, PCR1, PCR2{' and PCR8' if 'PCR8' in actual else ''} "
                     "as 96 lowercase hex digits")
    if any(claimed[k] != v for k, v in actual.items()):
        raise refuse("the PCRs recomputed from the EIF are not the ones it records")
    signature_ok = described.get("SignatureCheck")
    if "SignatureCheck" not in described and streamed is not None and streamed.signature is not None:
        signature_ok = streamed.signature.valid and streamed.signature.signed_pcr0 == claimed["PCR0"]
    if resolved["settings"]["backend"] == "pure":  # nitro-cli brings its own blobs and metadata
        blobs = load_blobs(resolved["blobs"]["path"], resolved["blobs"]["arch"],
                           Digest.parse(resolved["blobs"]["digest"]))
        if actual["PCR1"] != boot_pcr1(blobs):
            raise refuse("its PCR1 (kernel, cmdline, bootstrap ramdisk) is not this blob set's")
        metadata = described.get("Metadata", {}).get("enclaver", {})
        if metadata.get("image") != layer["enclave_image"] or metadata.get("blobs") != resolved["blobs"]["digest"]:
            raise refuse("the EIF's metadata names another enclave image or blob set")
    signing = resolved["settings"]["signing"]
    if signing:
        pcr8 = Signer.load(signing["certificate"], signing["key"]).pcr8
        if actual.get("PCR8") != pcr8 or not signature_ok:
            raise refuse("it is not signed with this build's certificate")
    elif "PCR8" in actual:
        raise refuse("it is signed, and this build is not")


def remove_stale_work(out: Path) -> None:
    """Remove work directories (`.tmp-<key>-<pid>`) that killed builds left, never a running
    build's: two `doit` runs, or `-n` workers, may build into one enclave's directory at once."""
    for stale in out.glob(".tmp-*"):
        owner = re.fullmatch(r"\.tmp-[0-9a-f]+-(\d+)", stale.name)
        pid = int(owner.group(1)) if owner else None
        with contextlib.suppress(OSError):
            if pid != os.getpid() and is_stale(Staging(stale, pid, stale.lstat().st_mtime, 0), 0, time.time()):
                shutil.rmtree(stale, ignore_errors=True)


@reported
def eif_enclave(manifest_path: str, name: str, cache_dir: str) -> dict[str, Any]:
    _, resolved = read_resolved(manifest_path, cache_dir, name)
    out = out_dir(cache_dir, name)
    layer = json.loads((out / LAYER).read_text())
    key = eif_key(resolved, layer)
    dest = out / key
    if dest.is_dir():
        try:
            stamp = _stamp(dest)  # before the hash: a change during it leaves a stamp that no longer matches
        except OSError:
            stamp = None
        if stamp is not None and intact(dest):
            _restamp(dest, stamp)
            point_latest(out, key)
            return json.loads((dest / EIF_RECORD).read_text())  # type: ignore[no-any-return]
    if dest.exists():
        shutil.rmtree(dest)  # incomplete or tampered: rebuild it
    remove_stale_work(out)
    work = out / f".tmp-{key}-{os.getpid()}"
    work.mkdir(parents=True)
    remote = RemoteCache.from_env()
    epoch = resolved["settings"]["epoch"]
    fetched = False
    if remote is not None:
        from enclaver_rules.eif.stream import StreamedEif

        streamed = StreamedEif(str(work / EIF_FILE), pcrs=remote.check_pcrs)
        try:  # the EIF's PCRs, CRC, metadata and signature are read as it downloads, not afterwards
            digests = remote.fetch("eif", key, work, OUTPUTS, {EIF_FILE: streamed})
            if digests is not None:
                check_fetched(work, key, resolved, layer, digests, streamed)
                fetched = True
                print(f"{name}: EIF {key} fetched from the remote cache {remote.location}"
                      f"{' (every PCR recomputed)' if remote.check_pcrs else ''}")
        except Poisoned as e:
            print(f"{name}: refused: {e}")
            for f in OUTPUTS:
                (work / f.name).unlink(missing_ok=True)
        finally:
            streamed.close()
    if not fetched:
        pcrs = _build(work, cache_dir, name, resolved, layer)
        (work / MEASUREMENTS).write_bytes(_measurements_json(pcrs))
        eif_digest = Digest.of_file(work / EIF_FILE)
        record = {
            "name": name, "key": key, "target": resolved["settings"]["target"], "epoch": epoch,
            "enclave_image": layer["enclave_image"],
            "eif": {"file": EIF_FILE, "sha256": eif_digest.hex,
                    "size": (work / EIF_FILE).stat().st_size},
            "measurements": pcrs, "development": resolved["blobs"]["development"],
            "inputs": {k: resolved[k] for k in ("app", "odyn", "blobs")},
        }
        (work / EIF_RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    origin = f"remote cache {remote.location}" if fetched and remote else "built"
    (work / LOCAL).write_text(json.dumps({"stat": _stamp(work), "origin": origin}))  # the rename keeps both
    os.replace(work, dest)
    point_latest(out, key)
    if remote is not None and not fetched and remote.upload("eif", key, dest, OUTPUTS, epoch, {EIF_FILE: eif_digest}):
        print(f"{name}: EIF {key} stored in the remote cache {remote.location}")
    return json.loads((dest / EIF_RECORD).read_text())  # type: ignore[no-any-return]


def latest_intact(cache_dir: str, name: str) -> bool:
    return intact(out_dir(cache_dir, name) / LATEST, quick=True)


def eif_tasks(enclaves: list[Any], cache_dir: str) -> Any:
    yield {"basename": "eif", "name": None, "doc": "build every enclave's EIF and measurements"}
    for e in enclaves:
        out = out_dir(cache_dir, e.name)
        yield {
            "basename": "eif", "name": e.name, "doc": f"the EIF and PCRs of {e.path}",
            "actions": [(eif_enclave, [e.path, e.name, cache_dir])],
            "file_dep": [str(out / RESOLVED), str(out / LAYER)],
            "targets": [str(out / LATEST / EIF_RECORD)],
            "uptodate": [(latest_intact, [cache_dir, e.name])],
            "verbosity": 2,
        }
