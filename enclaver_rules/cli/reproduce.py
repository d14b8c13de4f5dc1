"""`enclaver verify-reproduce SOURCE -f enclaver.yaml`: rebuild from scratch and compare the PCRs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from enclaver_rules.cli.exit_codes import ExitCode
from enclaver_rules.cli.options import Subparsers, add_json, epilog
from enclaver_rules.cli.trust import is_eif
from enclaver_rules.errors import InvalidInput

if TYPE_CHECKING:
    from enclaver_rules.cli.output import Output

CODES = {
    ExitCode.OK: "the rebuild gave the same PCRs",
    ExitCode.FAILURE: "the PCRs differ (the output says which, and why), or the rebuild failed",
    ExitCode.INVALID_INPUT: "the manifest or an argument is invalid",
}


def add_parser(commands: Subparsers[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    parser = commands.add_parser(
        "verify-reproduce", parents=[common], help="rebuild an enclave in a clean cache and compare its PCRs",
        description="Rebuild the enclave of a manifest from nothing — a fresh temporary cache, the odyn binary "
                    "built again from source, the app image and blob set fetched by digest — and compare the PCRs "
                    "with SOURCE (an EIF, a build directory, a measurements.json or a release image in the store). "
                    "When they differ and SOURCE has its EIF, says which PCR moved and why, down to the file in the "
                    "root file system; otherwise which input digest differs.",
        epilog=epilog(CODES), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(func=run, exit_codes=CODES)
    parser.add_argument("source", metavar="IMAGE|EIF|DIR|MEASUREMENTS")
    parser.add_argument("-f", "--file", default="enclaver.yaml", metavar="FILE", help="the manifest to rebuild")
    parser.add_argument("--cache-dir", metavar="DIR", help="the store to find a release image SOURCE in")
    parser.add_argument("--keep", metavar="DIR", help="rebuild in DIR and keep it (default: a temporary directory)")
    add_json(parser)


def _expected_eif(source: str, cache_dir: str | None, work: Path,
                  expected: dict[str, str]) -> tuple[Path | None, dict[str, object] | None]:
    """The EIF behind SOURCE, if it has one, and the build record beside it (for the epoch and inputs).
    A measurements.json in a build directory has its EIF beside it: used when the build record there
    says it has the same PCRs (so a file edited or copied in is never explained by another EIF)."""
    path = Path(source)
    if path.is_dir():
        record = path / "build.json"
        return ((path / "application.eif") if (path / "application.eif").is_file() else None,
                json.loads(record.read_text()) if record.is_file() else None)
    if path.is_file():
        record = path.parent / "build.json"
        doc = json.loads(record.read_text()) if record.is_file() else None
        if is_eif(path):
            return path, doc
        beside = path.parent / "application.eif"
        recorded = doc.get("measurements") if isinstance(doc, dict) else None
        same = isinstance(recorded, dict) and all(recorded.get(k) == v for k, v in expected.items())
        return (beside if same and beside.is_file() and is_eif(beside) else None), doc
    return _eif_from_release(source, cache_dir, work), None


#: What each PCR covers, to say something when there is no EIF to open (eif/diff.py says more with one).
PCR_MEANING = {
    "PCR1": "PCR1 differs: another kernel, kernel command line or bootstrap ramdisk (the blob set)",
    "PCR2": "PCR2 differs: another customer ramdisk — the app image's files, its cmd or env, the manifest or odyn",
    "PCR8": "PCR8 differs: another signing certificate",
}


def pcr_reasons(differing: list[str]) -> list[str]:
    """Lines saying what moved, from the PCRs alone."""
    lines = [PCR_MEANING[k] for k in differing if k in PCR_MEANING]
    if "PCR0" in differing and not {"PCR1", "PCR2"} & set(differing):
        lines.append("only PCR0 differs: the EIF's sections are the same parts put together differently")
    return lines


def _eif_from_release(ref: str, cache_dir: str | None, work: Path) -> Path | None:
    from enclaver_rules.oci.model import Manifest
    from enclaver_rules.oci.store import Store, default_cache_dir
    from enclaver_rules.rules.release import RELEASE_EIF

    store = Store(Path(cache_dir) if cache_dir else default_cache_dir())
    descriptor = store.resolve(ref) if store.root.is_dir() else None
    node = store.manifest(descriptor.digest) if descriptor else None
    if not isinstance(node, Manifest):
        return None
    target = work / "expected.eif"
    with open(target, "wb") as out:
        found = store.copy_file(node, RELEASE_EIF, out)
    return target if found else None


def run(args: argparse.Namespace, out: Output) -> int:
    import tempfile

    from rich.text import Text

    from enclaver_rules.cli.build import run_rule_set
    from enclaver_rules.cli.trust import measurements_of
    from enclaver_rules.eif.diff import explain
    from enclaver_rules.manifest import load_manifest
    from enclaver_rules.rules.common import BUILD, latest_dir

    path = Path(args.file)
    if not path.is_file():
        raise InvalidInput(f"{args.file}: no such file", file=args.file, fix="pass the manifest with -f FILE")
    manifest, _ = load_manifest(str(path))
    expected, how = measurements_of(args.source, args.cache_dir)
    with tempfile.TemporaryDirectory(prefix="enclaver-reproduce-") as tmp:
        work = Path(args.keep) if args.keep else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        expected_eif, record = _expected_eif(args.source, args.cache_dir, work, expected)
        env = {}
        if record and "epoch" in record:
            env["SOURCE_DATE_EPOCH"] = str(record["epoch"])  # the same metadata too, so the EIF is byte-identical
        cache = work / "cache"
        out.note(f"rebuilding {manifest.name} from nothing in {cache} (the odyn binary too) …")
        code = run_rule_set(path, manifest.name, cache, f"build:{manifest.name}", out, env)
        if code != ExitCode.OK:
            return code
        latest = latest_dir(str(cache), manifest.name)
        rebuilt = json.loads((latest / BUILD).read_text())
        actual = rebuilt["measurements"]
        differing = sorted(k for k in expected if expected.get(k) != actual.get(k))
        reasons: list[str] = []
        if differing:
            if expected_eif is not None:
                reasons = explain(str(expected_eif), str(latest / "application.eif"))
            else:
                reasons = pcr_reasons(differing)
                if record is not None:
                    reasons += [f"{k} image: recorded {record['inputs'][k]['digest']}, rebuilt from "  # type: ignore[index]
                                f"{rebuilt['inputs'][k]['digest']}" for k in ("app", "odyn", "blobs")
                                if record["inputs"][k]["digest"] != rebuilt["inputs"][k]["digest"]]  # type: ignore[index]
                reasons.append("SOURCE has no EIF beside it, so the files that differ cannot be named: pass the EIF "
                               "or the build directory it came from (or a release image in the store)")
        document = {"Source": how, "Reproduced": not differing, "Differing": differing, "Expected": expected,
                    "Rebuilt": actual, "Why": reasons}
        if args.keep:
            document["Rebuild"] = str(latest)
    if args.json:
        out.json(document)
    elif not differing:
        out.line(Text(f"reproduced: {manifest.name} rebuilds to the same {', '.join(sorted(expected))} "
                      f"({how})", style="green"))
    else:
        out.line(Text(f"NOT reproduced: {', '.join(differing)} differ ({how})", style="red"))
        for line in reasons:
            out.line(line)
    return ExitCode.OK if not differing else ExitCode.FAILURE


