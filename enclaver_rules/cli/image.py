"""`enclaver image pull|push|inspect` and `enclaver cache verify|gc`."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from enclaver_rules.cli.exit_codes import ExitCode
from enclaver_rules.cli.options import Subparsers, add_json, command, command_group
from enclaver_rules.errors import InvalidInput, OperationFailed

# Only what the parser needs loads with this module (every `enclaver` start builds the whole parser):
# the OCI modules, the progress bars and rich load in the commands that use them.
if TYPE_CHECKING:
    from enclaver_rules.cli.output import Output
    from enclaver_rules.oci.model import ImageConfig, Manifest
    from enclaver_rules.oci.reference import DaemonImage, OciLayoutImage, RegistryImage
    from enclaver_rules.oci.resolve import Sources
    from enclaver_rules.oci.store import Store
    from enclaver_rules.oci.transfer import StoredImage

TRANSFER_CODES = {
    ExitCode.OK: "done",
    ExitCode.FAILURE: "the image was not found, a digest did not match, or a registry or engine failed",
    ExitCode.INVALID_INPUT: "a reference, platform or flag is invalid",
}
VERIFY_CODES = {ExitCode.OK: "every blob matches its digest",
                ExitCode.FAILURE: "problems found (listed; damaged blobs were moved to quarantine)"}
GC_CODES = {ExitCode.OK: "unreachable blobs and dead writers' staging were removed"}
IMAGE_HELP = ("IMAGE is a registry reference (docker.io defaults apply), oci:PATH[:TAG], docker-archive:PATH "
              "or docker-daemon:REF.")


def _store_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache-dir", metavar="DIR",
                        help="the store (default: $ENC_CACHE_DIR, else cache/ beside the nearest dodo.py, "
                             "else ~/.cache/enclaver)")


def _source_args(parser: argparse.ArgumentParser) -> None:
    _store_args(parser)
    parser.add_argument("--platform", metavar="OS/ARCH[/VARIANT]",
                        help="which image of a multi-platform index (default linux/amd64; never the host's)")
    parser.add_argument("--insecure-registry", action="append", default=[], metavar="HOST[:PORT]",
                        help="allow plain HTTP to this registry (localhost and 127.0.0.1 always may)")


def add_parser(commands: Subparsers[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    group = command_group(commands, common, "image", "pull, push and inspect images")
    p = command(group, common, "pull", help="copy an image into the store", codes=TRANSFER_CODES, run=run_pull,
                description="Copy an image into the content-addressed store, verifying every blob: the ones it "
                            "fetches as they stream, the ones the store already had by hashing them again. A "
                            "damaged one is moved to the store's quarantine/ and fetched again. " + IMAGE_HELP)
    p.add_argument("image", metavar="IMAGE")
    _source_args(p)
    p.add_argument("--via-engine", action="store_true", help="let the local Docker engine pull it, then import it")
    add_json(p)

    p = command(group, common, "push", help="copy an image to a registry, an OCI layout or the engine",
                codes=TRANSFER_CODES, run=run_push,
                description="Copy SRC to DEST. " + IMAGE_HELP + " DEST is a registry reference, oci:PATH:TAG or "
                            "docker-daemon:REF (loads it into the engine). Blobs the destination has are skipped. "
                            "From a registry to a registry, each blob streams from the source into the destination, "
                            "verified as it passes (its last chunk held back until it is), with no copy in the store.")
    p.add_argument("source", metavar="SRC")
    p.add_argument("dest", metavar="DEST")
    _source_args(p)
    add_json(p)

    p = command(group, common, "inspect", help="show an image's digest, platform, config and layers",
                codes=TRANSFER_CODES, run=run_inspect,
                description="Show an image's manifest digest, platform, entrypoint, environment, labels and layers. "
                            "An image the store holds (by tag or digest) is shown from the store, without network; "
                            "else one the Docker engine has; else a registry image is read without its layers. "
                            + IMAGE_HELP)
    p.add_argument("image", metavar="IMAGE")
    _source_args(p)
    p.add_argument("--raw", action="store_true", help="print the manifest bytes exactly as stored or served")
    add_json(p)

    cache = command_group(commands, common, "cache", "check and clean the content-addressed store")
    p = command(cache, common, "verify", help="re-hash every blob in the store", codes=VERIFY_CODES, run=run_verify,
                description="Re-hash every blob and check that every ref's blobs are present. A blob whose bytes "
                            "do not match its digest is moved to the store's quarantine/ (kept for inspection, never "
                            "used; the next pull or build fetches it again). Pulls and pushes verify every blob "
                            "they read in the same way.")
    _store_args(p)
    add_json(p)
    p = command(cache, common, "gc", help="delete blobs no ref reaches, and dead writers' staging",
                codes=GC_CODES, run=run_gc,
                description="Delete blobs that no ref in index.json reaches, and the temporary files and directories "
                            "(`.tmp-…`, `*.tmp-PID`) that writers which died left in the cache. Both are kept while "
                            "younger than --grace seconds (a concurrent pull may not have tagged a blob yet); staging "
                            "whose writer (the PID in its name) is still running is kept at any age. The quarantine "
                            "is left alone.")
    _store_args(p)
    p.add_argument("--grace", type=int, default=3600, metavar="SECONDS",
                   help="keep younger blobs and staging (default 3600)")
    add_json(p)


def _store(args: argparse.Namespace) -> Store:
    from enclaver_rules.oci.store import Store, default_cache_dir

    return Store(Path(args.cache_dir) if args.cache_dir else default_cache_dir())


def _sources(args: argparse.Namespace, out: Output, *, use_engine: bool) -> Sources:
    from enclaver_rules.oci.model import Platform
    from enclaver_rules.oci.resolve import Sources  # requests and friends load only for image commands

    platform = Platform.parse(args.platform) if args.platform else None
    return Sources(_store(args), insecure=frozenset(args.insecure_registry), platform=platform, use_engine=use_engine)


def _summary(image: StoredImage, store: Store) -> dict[str, Any]:
    return {"name": image.name, "digest": str(image.digest), "mediaType": image.manifest.media_type,
            "platform": str(image.config.platform), "size": image.size, "source": image.source,
            "store": str(store.root)}


def _fetch(text: str, sources: Sources, *, again: bool = False, file: str = "IMAGE") -> StoredImage:
    """`text` in the store; `again`: from its source even if the store holds it (a damaged blob
    of it was just moved to quarantine: a digest-pinned registry image would else be looked up
    in the store, found incomplete, and not fetched)."""
    from enclaver_rules.oci.reference import RegistryImage
    from enclaver_rules.oci.resolve import location, resolve
    from enclaver_rules.oci.transfer import pull

    if again:
        loc = location(text, file=file)
        if isinstance(loc, RegistryImage):
            return pull(loc.ref, sources.store.init(), sources.registry(loc.ref.api_host), platform=sources.platform,
                        reporter=sources.reporter)
    return resolve(text, sources, file=file)


def _kept(store: Store) -> dict[str, int]:
    """The store's blobs now, by name, with their inode: `put` writes a new file (a new inode)
    for every blob it writes, so a blob with the same inode later was not written in between."""
    try:
        with os.scandir(store.blobs) as entries:
            return {e.name: e.inode() for e in entries if not e.name.startswith(".")}
    except FileNotFoundError:
        return {}


def _damaged(image: StoredImage, store: Store, before: dict[str, int]) -> list[str]:
    """The image's blobs the store held `before` (and still holds, unwritten since) that no longer
    match their digests: hashed now, moved to quarantine. Blobs written since were verified as
    they were written, so they are not hashed again."""
    damaged = []
    for d in (image.manifest.config, *image.manifest.layers):
        try:
            inode = store.path(d.digest).stat().st_ino
        except FileNotFoundError:
            damaged.append(d.digest.short)
            continue
        if before.get(d.digest.hex) == inode and not store.intact(d.digest):
            damaged.append(d.digest.short)
    return damaged


def _pull_checked(text: str, sources: Sources, out: Output) -> StoredImage:
    """Pull, then hash the blobs the store already had (a pull skips them): a damaged one is
    quarantined and the image fetched again, once."""
    from enclaver_rules.oci.store import CorruptBlob

    for attempt in (0, 1):
        before = _kept(sources.store)
        try:
            image = _fetch(text, sources, again=attempt > 0)
            damaged = _damaged(image, sources.store, before)
        except CorruptBlob as e:
            if attempt:
                raise
            out.note(f"{e.diagnostics[0].message}: moved to quarantine; fetching the image again", style="yellow")
            continue
        if not damaged:
            return image
        if attempt:
            raise OperationFailed(f"{text}: blobs still damaged after fetching them again: {', '.join(damaged)}",
                                  fix="the disk may be failing: run `enclaver cache verify` and check it")
        out.note(f"{text}: {len(damaged)} blob(s) in the store no longer matched their digests "
                 f"({', '.join(damaged)}): moved to quarantine; fetching them again", style="yellow")
    raise AssertionError("unreachable")


def run_pull(args: argparse.Namespace, out: Output) -> int:
    from rich.text import Text

    from enclaver_rules.cli.progress import reporter
    from enclaver_rules.oci.engine import Engine
    from enclaver_rules.oci.reference import RegistryImage
    from enclaver_rules.oci.resolve import location

    sources = _sources(args, out, use_engine=False)
    text = args.image
    if args.via_engine:
        loc = location(text)
        if not isinstance(loc, RegistryImage):
            raise InvalidInput("--via-engine needs a registry reference", file="IMAGE", fix="drop --via-engine")
        engine = Engine()
        engine.pull(f"{loc.ref.registry}/{loc.ref.repository}", loc.ref.tag or str(loc.ref.digest))
        text = f"docker-daemon:{loc.ref}"
    with reporter(out.err, not out.quiet) as progress:
        sources.reporter = progress
        image = _pull_checked(text, sources, out)
    if args.json:
        out.json(_summary(image, sources.store))
    else:
        out.line(Text(f"{image.name}  {image.digest}  {image.size / 1e6:.1f} MB  ({image.config.platform})"))
    return ExitCode.OK


def run_push(args: argparse.Namespace, out: Output) -> int:
    from enclaver_rules.cli.progress import reporter
    from enclaver_rules.oci.reference import DaemonImage, OciLayoutImage, RegistryImage
    from enclaver_rules.oci.resolve import location
    from enclaver_rules.oci.store import CorruptBlob

    sources = _sources(args, out, use_engine=True)
    dest = location(args.dest, file="DEST", source=False)  # a destination may not exist yet
    if not isinstance(dest, (RegistryImage, DaemonImage, OciLayoutImage)):
        raise InvalidInput(f"{args.dest}: cannot push to a docker-archive", file="DEST",
                           fix="use `docker save`, or push to oci:PATH:TAG")
    with reporter(out.err, not out.quiet) as progress:
        sources.reporter = progress
        try:
            src = location(args.source, file="SRC")
            if isinstance(src, RegistryImage) and isinstance(dest, RegistryImage):
                digest, where = _copy(args.source, src, dest, sources, progress)
            else:
                digest, where = _push(args.source, _fetch(args.source, sources, file="SRC"), dest, sources, progress)
        except CorruptBlob as e:  # read from the store, damaged: quarantined; fetch it again, once
            out.note(f"{e.diagnostics[0].message}: moved to quarantine; fetching {args.source} again", style="yellow")
            try:
                image = _fetch(args.source, sources, again=True, file="SRC")
            except OperationFailed:
                raise e from None  # nowhere to fetch it from: the damaged blob's own error says what to do
            digest, where = _push(args.source, image, dest, sources, progress)
    if args.json:
        out.json({"source": args.source, "destination": where, "digest": str(digest)})
    else:
        out.line(f"{where}  {digest}")
    return ExitCode.OK


def _copy(text: str, src: RegistryImage, dest: RegistryImage, sources: Sources, progress: Any) -> tuple[Any, str]:
    """Registry to registry, as `skopeo copy` does: blobs stream from the source into the
    destination, verified as they pass, without a round trip through the store (which serves the
    blobs it already keeps). A digest-pinned image the store holds complete needs no source."""
    from enclaver_rules.oci.relay import copy_image
    from enclaver_rules.oci.resolve import from_store, registry_manifest

    store = sources.store.init()
    stored = from_store(store, src.ref, sources.platform)
    if stored is not None:
        return _push(text, stored, dest, sources, progress)
    registry = sources.registry(src.ref.api_host)
    found, _ = registry_manifest(text, src.ref, sources, store, None)
    digest = copy_image(registry, src.ref, sources.registry(dest.ref.api_host), dest.ref, store,
                        platform=sources.platform, reporter=progress, found=found)
    return digest, str(dest.ref)


def _push(source: str, image: StoredImage, dest: RegistryImage | DaemonImage | OciLayoutImage, sources: Sources,
          progress: Any) -> tuple[Any, str]:
    """Every blob read from the store is verified as it goes out (CorruptBlob: nothing is kept
    under its name at the destination: a registry and `put` check the digest)."""
    from enclaver_rules.oci.engine import Engine
    from enclaver_rules.oci.reference import DaemonImage, RegistryImage
    from enclaver_rules.oci.resolve import location
    from enclaver_rules.oci.store import Store
    from enclaver_rules.oci.transfer import docker_archive, push

    store = sources.store
    if isinstance(dest, RegistryImage):
        src = location(source, file="SRC")
        mount = src.ref.repository if isinstance(src, RegistryImage) and src.ref.api_host == dest.ref.api_host else None
        digest = push(image, store, dest.ref, sources.registry(dest.ref.api_host), mount_from=mount, reporter=progress)
        return digest, str(dest.ref)
    if isinstance(dest, DaemonImage):
        Engine().load(docker_archive(image, store, str(dest.ref)))
        return image.digest, f"docker-daemon:{dest.ref}"
    layout = Store(dest.path).init()
    for d in (image.manifest.config, *image.manifest.layers):
        with store.open(d.digest) as f:  # hashed once: `put_stream` trusts a verified blob's own check
            layout.put_stream(f, d.digest, d.size, source=f"store {d.digest.short}")
    layout.put_bytes(image.manifest.raw, image.digest)
    layout.tag(dest.tag or "latest", image.manifest.descriptor())
    return image.digest, str(dest)


def run_inspect(args: argparse.Namespace, out: Output) -> int:
    from rich.text import Text

    from enclaver_rules.cli.progress import reporter
    from enclaver_rules.oci.resolve import describe

    sources = _sources(args, out, use_engine=True)
    with reporter(out.err, not out.quiet) as progress:
        sources.reporter = progress
        found = describe(args.image, sources)
    manifest, config, name, source, index = found.manifest, found.config, found.name, found.source, found.index
    if args.raw:
        out.stdout.write(manifest.raw.decode("utf-8", "replace"))
        return ExitCode.OK
    doc = _inspect_doc(name, source, manifest, config, str(index) if index else None)
    if args.json:
        out.json(doc)
    else:
        for key in ("name", "digest", "platform", "created", "entrypoint", "cmd", "env", "labels"):
            value = doc[key]
            out.line(Text(f"{key:<11} {value if isinstance(value, str) else json.dumps(value)}"))
        out.line(Text(f"{'layers':<11} {len(doc['layers'])}, {sum(x['size'] for x in doc['layers']) / 1e6:.1f} MB"))
        for layer in doc["layers"]:
            out.line(Text(f"{'':<11} {layer['digest']}  {layer['size']:>12,}  {layer['mediaType']}", style="dim"))
    return ExitCode.OK


def _inspect_doc(name: str, source: str, manifest: Manifest, config: ImageConfig, index: str | None) -> dict[str, Any]:
    return {"name": name, "source": source, "digest": str(manifest.digest), "index": index,
            "mediaType": manifest.media_type, "platform": str(config.platform),
            "created": config.data.get("created"), "entrypoint": config.entrypoint, "cmd": config.cmd,
            "env": config.env, "labels": config.labels, "config": str(manifest.config.digest),
            "layers": [{"digest": str(d.digest), "size": d.size, "mediaType": d.media_type} for d in manifest.layers]}


def run_verify(args: argparse.Namespace, out: Output) -> int:
    from rich.text import Text

    from enclaver_rules.cli.progress import reporter

    store = _store(args)
    total = 0
    for blob in store.blobs.iterdir() if store.blobs.is_dir() else []:
        with contextlib.suppress(FileNotFoundError):
            total += blob.stat().st_size if not blob.name.startswith(".") else 0
    with reporter(out.err, not out.quiet) as progress:
        problems = store.verify(progress.task(f"verify {store.root}", total))
    quarantined = store.quarantined()
    if args.json:
        out.json({"store": str(store.root), "ok": not problems,
                  "problems": [{"path": p.path, "message": p.message} for p in problems],
                  "quarantine": [str(q) for q in quarantined]})
    else:
        for p in problems:
            out.line(Text(f"{p.path}: {p.message}", style="red"))
        if not problems:
            out.line(Text(f"{store.root}: every blob matches its digest", style="green"))
        if quarantined:
            out.note(f"{len(quarantined)} damaged cop{'y' if len(quarantined) == 1 else 'ies'} kept in "
                     f"{store.quarantine_dir} for inspection (never used; delete them when done); the next pull "
                     "or build fetches the blobs again")
    return ExitCode.FAILURE if problems else ExitCode.OK


def run_gc(args: argparse.Namespace, out: Output) -> int:
    from enclaver_rules.oci.store import Staging

    store = _store(args)
    staging: list[Staging] = []
    removed, freed = store.gc(grace_seconds=args.grace, staging=staging)
    if args.json:
        out.json({"store": str(store.root), "removed": removed, "bytes": freed,
                  "staging": [{"path": str(e.path), "pid": e.pid} for e in staging]})
    else:
        out.line(f"{store.root}: removed {removed} blobs, {freed / 1e6:.1f} MB; "
                 f"{len(staging)} stale staging entr{'y' if len(staging) == 1 else 'ies'}")
        for e in staging:
            writer = f"process {e.pid}, gone" if e.pid is not None else "writer unknown"
            out.note(f"  removed {e.path} ({writer})")
    return ExitCode.OK
