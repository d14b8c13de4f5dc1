"""`enclaver lock [-f enclaver.yaml] [--update]`: pin every input of an enclave by digest."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from enclaver_rules.cli.exit_codes import ExitCode
from enclaver_rules.cli.options import Subparsers, add_json, epilog
from enclaver_rules.errors import InvalidInput

if TYPE_CHECKING:
    from enclaver_rules.cli.output import Output

CODES = {
    ExitCode.OK: "the lock was written, or already matches",
    ExitCode.FAILURE: "the lock is stale (without --update), or an input could not be resolved",
    ExitCode.INVALID_INPUT: "the manifest or an argument is invalid",
}


def add_parser(commands: Subparsers[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    parser = commands.add_parser(
        "lock", parents=[common], help="pin the app image, odyn image and blob set of an enclave by digest",
        description="Resolve every input of the manifest (the app image, the odyn image — built from source by "
                    "default — and the kernel blob set) and write their digests to enclaver.lock beside it. With "
                    "a lock, builds fetch registry images by the locked digest and refuse inputs that changed. An "
                    "existing lock that no longer matches is reported, not overwritten, unless --update.",
        epilog=epilog(CODES), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(func=run, exit_codes=CODES)
    parser.add_argument("-f", "--file", default="enclaver.yaml", metavar="FILE", help="the manifest")
    parser.add_argument("--update", action="store_true", help="rewrite a lock whose digests no longer match")
    parser.add_argument("--cache-dir", metavar="DIR", help="the store (default: as for enclaver build)")
    add_json(parser)


def run(args: argparse.Namespace, out: Output) -> int:
    from enclaver_rules.cli.build import run_rule_set
    from enclaver_rules.manifest import load_manifest
    from enclaver_rules.oci.store import atomic_write, default_cache_dir
    from enclaver_rules.rules.resolve import lock_differences, lock_document, lock_path, resolve_enclave

    path = Path(args.file)
    if not path.is_file():
        raise InvalidInput(f"{args.file}: no such file", file=args.file, fix="pass the manifest with -f FILE")
    manifest, _ = load_manifest(str(path))
    cache = Path(args.cache_dir) if args.cache_dir else default_cache_dir(str(path.resolve().parent))
    for task in ("odyn_image", "runtime_image"):  # the default odyn and runtime images, if used
        code = run_rule_set(path, manifest.name, cache, task, out)
        if code != ExitCode.OK:
            return code
    # the undecorated action: errors are raised (with their exit codes), not turned into doit failures
    resolved = resolve_enclave.__wrapped__(  # type: ignore[attr-defined]
        str(path.resolve()), manifest.name, str(cache), False)
    lock = lock_path(str(path))
    document = lock_document(resolved)
    changes: list[str] = []
    if lock.is_file():
        changes = lock_differences(json.loads(lock.read_text()), resolved)
        if not changes:
            out.note(f"{lock} already pins these inputs")
            if args.json:
                out.json({"lock": str(lock), "changed": [], **document})
            return ExitCode.OK
        if not args.update:
            for line in changes:
                out.note(line, style="red")
            out.note(f"{lock} is stale: run with --update to accept the new digests", style="red")
            return ExitCode.FAILURE
    atomic_write(lock, json.dumps(document, indent=2).encode() + b"\n")
    if args.json:
        out.json({"lock": str(lock), "changed": changes, **document})
    else:
        out.line(f"wrote {lock}")
        for key in ("app", "odyn", "blobs"):
            out.line(f"  {key:<5} {document[key]['digest']}")
    return ExitCode.OK
