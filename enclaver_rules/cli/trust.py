"""`enclaver trust SOURCE`: an enclave's measurements, and the KMS key policy that trusts exactly it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from enclaver_rules.cli.exit_codes import ExitCode
from enclaver_rules.cli.options import Subparsers, add_json
from enclaver_rules.errors import InvalidInput, OperationFailed

if TYPE_CHECKING:
    from enclaver_rules.cli.output import Output

CODES = {
    ExitCode.OK: "the measurements (and the policy, if asked for) were printed",
    ExitCode.FAILURE: "SOURCE could not be read (no such image, not an EIF, corrupt, CRC mismatch)",
    ExitCode.INVALID_INPUT: "an argument is invalid, or the enclave is a debug-mode one (all-zero PCRs)",
}


def add_parser(commands: Subparsers[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    parser = _top(commands, common)  # a top-level command, not a group
    parser.add_argument("source", metavar="IMAGE|EIF|DIR",
                        help="an EIF (PCRs recomputed), a build output directory (cache/out/NAME/latest), a "
                             "measurements.json, or a release image: in the store, else in its registry (read "
                             "from its labels, else from its measurements referrer; --recompute: from its EIF)")
    parser.add_argument("--recompute", action="store_true",
                        help="for a release image: fetch it and recompute the PCRs from the EIF inside, refusing "
                             "labels that disagree (labels and referrers are the pusher's claims)")
    parser.add_argument("--insecure-registry", action="append", default=[], metavar="HOST[:PORT]",
                        help="allow plain HTTP to this registry (localhost and 127.0.0.1 always may)")
    parser.add_argument("--kms-policy", action="store_true",
                        help="print a KMS key policy for it instead: the policy alone on stdout (pipe-able), "
                             "the measurements on stderr")
    parser.add_argument("--account", metavar="ID",
                        help="the AWS account that owns the key (with --kms-policy; default: $ENC_KMS_ACCOUNT, "
                             "else required)")
    parser.add_argument("--admin", metavar="ARN",
                        help="who administers the key (default: $ENC_KMS_ADMIN, else the account root)")
    parser.add_argument("--principal", metavar="ARN",
                        help="who calls KMS from the parent instance (default: $ENC_KMS_PRINCIPAL, else the "
                             "account root)")
    parser.add_argument("--pcr", action="append", choices=["PCR0", "PCR1", "PCR2", "PCR8"],
                        help="pin this measurement too (repeatable; PCR0 always)")
    parser.add_argument("--update", metavar="POLICY.json",
                        help="merge into this existing policy (rollover: earlier images stay; admin kept): the "
                             "merged policy on stdout, the diff on stderr")
    parser.add_argument("--immutable", action="store_true",
                        help="a policy nobody can change once applied: no kms:PutKeyPolicy for anyone, not even "
                             "the admin (default: $ENC_KMS_IMMUTABLE=1). Irreversible: a later release needs a new "
                             "key; KMS takes it only with --bypass-policy-lockout-safety-check")
    parser.add_argument("--allow-debug", action="store_true",
                        help="accept a debug-mode enclave (all-zero PCRs): trusts any code, tests only")
    parser.add_argument("--cache-dir", metavar="DIR", help="the store to look IMAGE up in")
    add_json(parser)


def _top(commands: Subparsers[argparse.ArgumentParser], common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from enclaver_rules.cli.options import epilog

    parser = commands.add_parser(
        "trust", parents=[common], help="print an enclave's measurements and a KMS key policy that trusts it",
        description="Read the measurements of an enclave (recomputed from an EIF, or from a build's outputs, or "
                    "from a release image's labels or measurements referrer, in the store or its registry, or "
                    "recomputed from the EIF inside it with --recompute — the output says which) and print "
                    "them, with --kms-policy "
                    "as a KMS key policy that lets the decrypt-side actions through only for this PCR0 (and the "
                    "PCRs given with --pcr), with a deny backstop, for every caller, of every action that releases "
                    "or moves plaintext (ReEncrypt included) and of grants. The key administrator can still "
                    "replace the policy, unless it is --immutable.",
        epilog=epilog(CODES), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(func=run, exit_codes=CODES)
    return parser


def is_eif(path: Path) -> bool:
    """By its magic: four bytes read, not the whole file (an EIF is as large as the app)."""
    from enclaver_rules.eif.format import MAGIC

    with open(path, "rb") as f:
        return f.read(len(MAGIC)) == MAGIC


def _from_eif(path: Path) -> tuple[dict[str, str], str]:
    from enclaver_rules.eif.describe import describe

    info = describe(str(path))
    if not info["CheckCRC"]:
        raise OperationFailed(f"{path}: the CRC does not match: the file was modified or is corrupt")
    return _pcrs(info["Measurements"]), f"recomputed from the EIF {path}"


def _pcrs(measurements: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in measurements.items() if k.startswith("PCR")}


def measurements_of(source: str, cache_dir: str | None, recompute: bool = False,
                    insecure: frozenset[str] = frozenset()) -> tuple[dict[str, str], str]:
    """(PCRs, where they came from)."""
    path = Path(source)
    if path.is_dir():
        if (path / "application.eif").is_file():
            pcrs, how = _from_eif(path / "application.eif")
            recorded = path / "measurements.json"
            if recorded.is_file():
                stored = json.loads(recorded.read_text())["Measurements"]
                if any(stored.get(k) != v for k, v in pcrs.items()):
                    raise OperationFailed(f"{recorded} disagrees with the EIF beside it",
                                          fix="rebuild: the cache entry was modified")
            return pcrs, how
        path = path / "measurements.json"
    if path.is_file():
        if is_eif(path):
            return _from_eif(path)
        try:
            doc = json.loads(path.read_text())
            return _pcrs(doc["Measurements"]), f"read from {path}"
        except (ValueError, KeyError, TypeError):
            raise OperationFailed(f"{path} is neither an EIF nor a measurements.json") from None
    return _from_image(source, cache_dir, recompute, insecure)


def _eif_pcrs(store: Any, manifest: Any, ref: str) -> dict[str, str]:
    """The PCRs recomputed from the EIF a release image carries (copied out of its layer first)."""
    import tempfile

    from enclaver_rules.rules.release import RELEASE_EIF

    with tempfile.TemporaryDirectory(prefix="enclaver-trust-") as work:
        eif = Path(work) / "application.eif"
        with open(eif, "wb") as f:
            if not store.copy_file(manifest, RELEASE_EIF, f):
                raise OperationFailed(f"{ref} holds no {RELEASE_EIF}", fix="is it a release image?")
        return _from_eif(eif)[0]


def _from_referrer(registry: Any, repository: str, digest: Any, ref: str, store: Any) -> tuple[dict[str, str], str]:
    from enclaver_rules.oci import referrers

    for descriptor in referrers.list_referrers(registry, repository, digest, referrers.MEASUREMENTS.artifact_type):
        artifact = referrers.fetch_artifact(registry, repository, descriptor, store, subject=digest)
        try:
            doc = json.loads(artifact.file(referrers.MEASUREMENTS.filename).data)
            return _pcrs(doc["Measurements"]), f"read from the measurements referrer {artifact.digest} of {ref}"
        except (ValueError, KeyError, TypeError):
            continue
    raise OperationFailed(f"{ref} carries no enclaver measurement labels and no measurements referrer",
                          fix="is it a release image? `enclaver build --push` attaches both")


def _from_image(ref: str, cache_dir: str | None, recompute: bool = False,
                insecure: frozenset[str] = frozenset()) -> tuple[dict[str, str], str]:
    """A release image's PCRs: from the store when it is there, else from its registry; from its
    labels, else its measurements referrer; with `recompute`, from the EIF inside, checked against
    the labels."""
    from enclaver_rules.oci.enclave import label_disagreements, label_pcrs
    from enclaver_rules.oci.model import ImageConfig, Manifest
    from enclaver_rules.oci.store import Store, default_cache_dir

    store = Store(Path(cache_dir) if cache_dir else default_cache_dir())
    descriptor = store.resolve(ref) if store.root.is_dir() else None
    if descriptor is not None:
        node = store.manifest(descriptor.digest)
        if not isinstance(node, Manifest):
            raise OperationFailed(f"{ref} is an index, not a release image")
        labels = ImageConfig.parse(store.read(node.config.digest), f"{ref} config").labels
        where, manifest = f"{ref} ({descriptor.digest}) in the store", node
        claimed = label_pcrs(labels)
        if not claimed and not recompute:
            raise OperationFailed(f"{ref} carries no enclaver measurement labels", fix="is it a release image?")
    else:
        from enclaver_rules.oci.reference import BadReference, Reference
        from enclaver_rules.oci.registry import Registry
        from enclaver_rules.oci.transfer import metadata, pull

        try:
            parsed = Reference.parse(ref)
        except (BadReference, ValueError):
            raise OperationFailed(f"{ref}: no such file, and not an image reference",
                                  fix="pass an EIF, a build directory, a measurements.json or a release image") from None
        # Docker Hub's name (docker.io) is not the host serving its API: ask the reference, as `image pull` does
        registry = Registry(parsed.api_host, insecure=parsed.registry in insecure or parsed.api_host in insecure)
        remote, config, _ = metadata(registry, parsed, None)
        where = f"{ref} ({remote.digest}) in its registry"
        claimed = label_pcrs(config.labels)
        if not recompute:
            if claimed:
                return claimed, f"read from the labels of {where}"
            return _from_referrer(registry, parsed.repository, remote.digest, ref, store.init())
        manifest = pull(parsed, store.init(), registry).manifest
        if manifest.digest != remote.digest:
            raise OperationFailed(f"{ref} moved while it was read ({remote.digest}, then {manifest.digest})",
                                  fix="pin it by digest: REPO@sha256:…")
    if not recompute:
        return claimed, f"read from the labels of {where}"
    measured = _eif_pcrs(store, manifest, ref)
    if wrong := label_disagreements(claimed, measured):
        raise OperationFailed(f"{ref}: its labels and its EIF disagree: " + "; ".join(wrong),
                              fix="do not trust this image: it was relabelled or its EIF replaced")
    agree = "; its labels agree" if claimed else "; it has no measurement labels"
    return measured, f"recomputed from the EIF in {where}{agree}"


def run(args: argparse.Namespace, out: Output) -> int:
    """Without --json, stdout carries exactly one JSON document, so it can be redirected to a file:
    the key policy when one is asked for (what `aws kms put-key-policy` takes), else the
    measurements. Everything for people (the source, the measurements beside a policy, a diff)
    goes to stderr."""
    import os

    from rich.text import Text

    from enclaver_rules.policy import kms

    pcrs, how = measurements_of(args.source, args.cache_dir, args.recompute, frozenset(args.insecure_registry))
    document: dict[str, Any] = {"Source": how, "Measurements": pcrs}
    if args.kms_policy or args.update:
        trust = kms.trust_from(os.environ, account=args.account, admin=args.admin, principal=args.principal,
                               pcrs=["PCR0", *[p for p in (args.pcr or []) if p != "PCR0"]],
                               allow_debug=args.allow_debug, immutable=args.immutable, flags=True)
        if args.update:
            try:
                existing = json.loads(Path(args.update).read_text())
            except (OSError, ValueError) as e:
                raise InvalidInput(f"{args.update}: {e}", field="--update", fix="pass a JSON key policy") from None
            policy, diff = kms.update_policy(existing, pcrs, trust)
            document["Diff"] = diff
        else:
            policy = kms.key_policy(pcrs, trust)
        document["KeyPolicy"] = policy
        if trust.immutable:  # on stderr whatever the output mode, -q included: it cannot be undone
            document["Warnings"] = [kms.LOCKOUT_WARNING]
            out.err.print(Text(f"warning: {kms.LOCKOUT_WARNING}", style="yellow"))
    elif not args.allow_debug and pcrs.get("PCR0") == kms.DEBUG_PCR:
        raise InvalidInput("PCR0 is all zeros: a debug-mode enclave, whose measurements prove nothing",
                           fix="pass --allow-debug to print it anyway")
    if args.json:
        out.json(document)
        return ExitCode.OK
    out.note(how)
    if "KeyPolicy" not in document:
        out.line(Text(json.dumps({"Measurements": pcrs}, indent=2)))
        return ExitCode.OK
    for name, value in pcrs.items():
        out.note(f"{name} {value}")
    for line in document.get("Diff", []):
        out.note(line, style="green" if line.startswith("+") else "red" if line.startswith("-") else "")
    out.line(Text(json.dumps(document["KeyPolicy"], indent=2)))
    return ExitCode.OK
