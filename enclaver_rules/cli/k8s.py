"""`enclaver k8s manifest IMAGE|EIF|BUILD_DIR`: a Deployment for the AWS Nitro Enclaves device plugin.

Parsing flags, reading the source and printing only; the Deployment is `enclaver_rules.k8s`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from enclaver_rules import redact
from enclaver_rules.cli.exit_codes import ExitCode
from enclaver_rules.cli.options import Subparsers, add_json, command, command_group
from enclaver_rules.errors import Diagnostic, InvalidInput, OperationFailed

if TYPE_CHECKING:
    from enclaver_rules.cli.output import Output

CODES = {
    ExitCode.OK: "the Deployment was written (on stdout, or to -o FILE)",
    ExitCode.FAILURE: "the source could not be read (a corrupt EIF, its enclave image missing from the store), "
                      "or -o FILE could not be written",
    ExitCode.INVALID_INPUT: "a flag is wrong (--replicas, --namespace, --name, --node-selector, --image), the "
                            "source is not an enclave built by enclaver, or its manifest cannot run as it is "
                            "(defaults.memory_mb below nitro-cli's floor for the EIF)",
}
DESCRIPTION = (
    "Write a Kubernetes Deployment (YAML) that runs an enclave's release image on nodes with the AWS Nitro "
    "Enclaves device plugin: the container asks for one aws.ec2.nitro/nitro_enclaves device (the plugin hands "
    "it /dev/nitro_enclaves; no privileged mode) and for the enclave's memory as huge pages (defaults.memory_mb "
    "of the manifest, at least 4 × the EIF's size, rounded up to whole pages), limits equal to requests; an "
    "emptyDir of that page size is mounted as in AWS's example; manifest ingress ports become container ports; "
    "the pods select nodes labelled aws-nitro-enclaves-k8s-dp=enabled, where the plugin runs. The container has "
    "no command: the release image's entrypoint runs `enclaver run`. The image is pinned by digest when the "
    "source tells it: a release image in the store, or a build directory (its pushed.json, else build.json); "
    "for a bare EIF the manifest's target tag is used unless --image names the pushed image.")
REPLICAS_HELP = "pods (default 1); each holds an enclave slot and its huge pages on its node"
PIN_FIX = "pass --image REGISTRY/REPOSITORY@sha256:<digest> (`doit push:NAME` prints the pushed digest)"


def add_parser(commands: Subparsers[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    group = command_group(commands, common, "k8s", "Kubernetes manifests for the AWS Nitro Enclaves device plugin")
    p = command(group, common, "manifest", help="write a Deployment that runs the enclave through the device plugin",
                description=DESCRIPTION, codes=CODES, run=run_manifest)
    p.add_argument("source", metavar="IMAGE|EIF|BUILD_DIR",
                   help="a release image in the store, an EIF built by enclaver, or a build directory "
                        "(cache/out/NAME/latest)")
    p.add_argument("-o", "--output", metavar="FILE", help="write the YAML here, atomically (default: stdout)")
    p.add_argument("--replicas", type=int, default=1, metavar="N", help=REPLICAS_HELP)
    p.add_argument("--namespace", metavar="NS", help="metadata.namespace (default: none, kubectl's current one)")
    p.add_argument("--name", metavar="NAME", help="the Deployment's name (default: the manifest's name)")
    p.add_argument("--hugepage-size", choices=("2Mi", "1Gi"), default="2Mi", metavar="2Mi|1Gi",
                   help="the huge page size the nodes report for the allocator's reservation (default 2Mi; "
                        "`kubectl describe node` shows hugepages-2Mi and hugepages-1Gi)")
    p.add_argument("--node-selector", action="append", default=[], metavar="KEY=VALUE",
                   help="schedule on nodes with this label (repeat for several; replaces the default "
                        "aws-nitro-enclaves-k8s-dp=enabled)")
    p.add_argument("--image", metavar="REF", help="the image the pods pull (default: the release image, pinned "
                                                  "by digest where the source tells it)")
    p.add_argument("--enclave-cpus", action="store_true",
                   help="also request defaults.cpu_count aws.ec2.nitro/nitro_enclaves_cpus (the plugin's CPU "
                        "advertisement, ENCLAVE_CPU_ADVERTISEMENT=true, must be on)")
    p.add_argument("--cache-dir", metavar="DIR", help="the store (default: $ENC_CACHE_DIR, else the repository's)")
    add_json(p)


def _reference(text: str, field: str) -> Any:
    from enclaver_rules.oci.reference import BadReference, Reference

    try:
        return Reference.parse(text)
    except BadReference as e:
        raise InvalidInput(e.message, field=field, fix=e.fix) from None


def _selectors(values: list[str]) -> tuple[tuple[tuple[str, str], ...], list[Diagnostic]]:
    from enclaver_rules.k8s import DEFAULT_NODE_SELECTOR, parse_node_selector

    if not values:
        return DEFAULT_NODE_SELECTOR, []
    found: list[tuple[str, str]] = []
    problems: list[Diagnostic] = []
    for text in values:
        try:
            found.append(parse_node_selector(text))
        except InvalidInput as e:
            problems += e.diagnostics
    return tuple(found), problems


def _from_build(source: Path, pcrs: dict[str, str], name: str) -> tuple[str, str] | None:
    """(reference, how) from a build's records beside the EIF: the pushed digest, else the release image
    built there (push it before applying). None when there are none, or they describe another EIF."""
    from enclaver_rules.oci.digest import Digest

    if not source.exists():  # an image name
        return None
    directory = source if source.is_dir() else source.parent
    try:
        summary = json.loads((directory / "build.json").read_text())
        if {k: str(v).lower() for k, v in summary["measurements"].items()} != \
                {k: v.lower() for k, v in pcrs.items() if k in summary["measurements"]}:
            return None
        target, digest = summary["target"], str(Digest.parse(summary["release_image"]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    how = f"the release image built in {directory}; push it before applying: `doit push:{name}`"
    try:
        pushed = json.loads((directory / "pushed.json").read_text())
        if pushed.get("digest") == digest:
            target, how = pushed.get("target", target), f"pushed: {directory / 'pushed.json'}"
    except (OSError, ValueError, AttributeError):
        pass
    return f"{_reference(target, 'target').name}@{digest}", how


def image_for(args: argparse.Namespace, runnable: Any, store: Any) -> tuple[str, str, bool]:
    """(the reference the pods pull, where it came from, whether it is pinned by digest)."""
    if args.image:
        ref = _reference(args.image, "--image")
        return str(ref), "given with --image", ref.digest is not None
    built = _from_build(Path(args.source), runnable.measurements, runnable.manifest.name)
    if built is not None:
        return built[0], built[1], True
    if runnable.labels:  # a release image in the store: the name it has there is its target
        descriptor = store.resolve(args.source)
        if descriptor is not None:
            ref = _reference(args.source, "IMAGE")
            return f"{ref.name}@{descriptor.digest}", f"the release image {args.source} in the store", True
    ref = _reference(runnable.manifest.target, "target")
    return str(ref), "the manifest's target", ref.digest is not None


def run_manifest(args: argparse.Namespace, out: Output) -> int:
    import tempfile

    from enclaver_rules.k8s import Options, deployment, render, sizing
    from enclaver_rules.oci.store import Store, atomic_file, default_cache_dir
    from enclaver_rules.runtime.runnable import resolve

    selectors, problems = _selectors(args.node_selector)
    flags = Options(image="example.invalid/pending", name=args.name, namespace=args.namespace,
                    replicas=args.replicas, hugepage_size=args.hugepage_size, node_selector=selectors,
                    enclave_cpus=args.enclave_cpus)
    problems += flags.problems()
    if problems:  # refused before anything is read
        raise InvalidInput(diagnostics=problems)
    if args.image:
        _reference(args.image, "--image")
    store = Store(Path(args.cache_dir) if args.cache_dir else default_cache_dir())
    with tempfile.TemporaryDirectory(prefix="enclaver-k8s-") as tmp:
        runnable = resolve(args.source, store, Path(tmp))
        eif_size = runnable.eif.stat().st_size
        image, how, pinned = image_for(args, runnable, store)
        options = Options(image=image, name=args.name, namespace=args.namespace, replicas=args.replicas,
                          hugepage_size=args.hugepage_size, node_selector=selectors, enclave_cpus=args.enclave_cpus)
        manifest = runnable.manifest
        document = deployment(manifest, eif_size, options, runnable.measurements)
        size = sizing(manifest, eif_size, args.hugepage_size)
    pages = f"{size.pages} {size.page_size} huge page{'s' if size.pages != 1 else ''}"
    replicas = f"{args.replicas} replica{'s' if args.replicas != 1 else ''}"
    summary = (f"{manifest.name}: {size.memory_mib} MiB of enclave memory as {pages} ({size.quantity}; the EIF "
               f"needs {size.eif_min_mib} MiB), {size.cpu_count} CPUs from the allocator's pool, {replicas}")
    comments = [f"enclaver k8s manifest {args.source}: {summary}", f"image: {image} ({how})",
                "for nodes running the AWS Nitro Enclaves device plugin, selected by "
                + ", ".join(f"{k}={v}" for k, v in selectors)]
    text = redact.text(render([document], comments))  # nothing secret in it; the rule for every output
    if args.output:
        try:
            with atomic_file(args.output) as f:
                f.write(text.encode())
        except OSError as e:
            raise OperationFailed(f"cannot write it: {e.strerror or e}", file=args.output, field="-o",
                                  fix="name a file in an existing directory you may write to") from None
    if args.json:
        out.json({"deployment": document, "image": image, "image_source": how, "pinned": pinned,
                  "enclave": {"memory_mib": size.memory_mib, "eif_min_mib": size.eif_min_mib,
                              "cpu_count": size.cpu_count, "hugepage_size": size.page_size, "pages": size.pages,
                              "hugepages": size.quantity},
                  **({"output": args.output} if args.output else {})})
    elif not args.output:
        out.stdout.write(text)
    out.note(summary)
    out.note(f"image {image} ({how})")
    if not pinned:
        out.note(f"warning: {image} is not pinned by digest: a tag can move to other code; {PIN_FIX}",
                 style="yellow")
    if args.output:
        out.note(f"wrote {args.output}")
    return ExitCode.OK
