"""`enclaver eif build|describe` and `enclaver blobs dev`."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from enclaver_rules.cli.exit_codes import ExitCode
from enclaver_rules.cli.image import _source_args, _sources
from enclaver_rules.cli.options import Subparsers, add_json, command, command_group
from enclaver_rules.eif.blobs import DEFAULT_BLOBS, KERNEL_NAMES  # the parser's default and choices
from enclaver_rules.errors import InvalidInput

if TYPE_CHECKING:  # the rest loads in the commands that use it: every `enclaver` start builds this parser
    from enclaver_rules.cli.output import Output
    from enclaver_rules.eif.blobs import BlobSet
    from enclaver_rules.oci.resolve import Sources

BUILD_CODES = {
    ExitCode.OK: "the EIF was written",
    ExitCode.FAILURE: "the image or blob set could not be read (not found, digest mismatch, corrupt)",
    ExitCode.INVALID_INPUT: "an argument, the blob set or the signing material is invalid",
}
DESCRIBE_CODES = {
    ExitCode.OK: "described; CRC and signature (if any) are valid",
    ExitCode.FAILURE: "the file is not a valid EIF, its CRC is wrong, or its signature does not verify",
}
DEV_CODES = {ExitCode.OK: "the development blob set was written", ExitCode.INVALID_INPUT: "bad arguments"}


def add_parser(commands: Subparsers[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    group = command_group(commands, common, "eif", "build and describe enclave image files")
    p = command(group, common, "build", help="build an EIF from an image, without Docker", codes=BUILD_CODES,
                run=run_build,
                description="Build an enclave image file (EIF) from IMAGE and a kernel blob set, byte-compatible "
                            "with `nitro-cli build-enclave`, so the PCRs are the same. No Docker engine is needed. "
                            "The architecture comes from the image (linux/amd64 → x86_64, linux/arm64 → aarch64).")
    p.add_argument("--image", required=True, metavar="IMAGE", help="the enclave's image (any image reference)")
    p.add_argument("-f", "--file", metavar="FILE",
                   help="take --backend, --blobs and --nitro-cli-image defaults from this manifest's `build` block "
                        "(with ENC_BUILD_* variables applied); flags given here still win")
    p.add_argument("--blobs", metavar="DIR_OR_IMAGE",
                   help=f"kernel blob set: a directory (default {DEFAULT_BLOBS}) or an image carrying one")
    p.add_argument("--blobs-digest", metavar="DIGEST", help="refuse a blob set whose digest differs")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="where to write the EIF")
    p.add_argument("--signing-certificate", metavar="PEM", help="sign the EIF (adds PCR8); with --signing-key")
    p.add_argument("--signing-key", metavar="PEM", help="EC private key (P-256/384/521) for --signing-certificate")
    p.add_argument("--image-name", metavar="NAME", help="ImageName in the EIF's metadata (default: the reference)")
    p.add_argument("--backend", choices=["pure", "nitro-cli"],
                   help="pure: this process, no Docker (default); nitro-cli: AWS's nitro-cli in a container, "
                        "through the Docker engine, as upstream enclaver does")
    p.add_argument("--nitro-cli-image", metavar="IMAGE", help="the nitro-cli image for --backend nitro-cli")
    _source_args(p)
    add_json(p)

    p = command(group, common, "describe", help="show an EIF's measurements, sections and metadata",
                codes=DESCRIBE_CODES, run=run_describe,
                description="Read an EIF, recompute its PCRs from its sections, check its CRC and signature, and "
                            "print what `nitro-cli describe-eif` prints (plus the section table).")
    p.add_argument("file", metavar="FILE")
    add_json(p)

    blobs = command_group(commands, common, "blobs", "kernel blob sets")
    p = command(blobs, common, "dev", help="write a deterministic development blob set", codes=DEV_CODES,
                run=run_dev,
                description="Write a development blob set (synthetic kernel, init and nsm.ko; the real cmdline) so "
                            "the pipeline can be tried where no Nitro blob set exists. It is the same on every "
                            "machine, is marked as development in its own metadata and in every EIF built from it, "
                            "and cannot boot.")
    p.add_argument("-o", "--output", required=True, metavar="DIR")
    p.add_argument("--arch", choices=sorted(KERNEL_NAMES), default="x86_64")
    add_json(p)


def _blobs(args: argparse.Namespace, arch: str, out: Output) -> BlobSet:
    from enclaver_rules.eif.blobs import load_blobs
    from enclaver_rules.oci.digest import Digest

    expect = None
    if args.blobs_digest:
        try:
            expect = Digest.parse(args.blobs_digest)
        except ValueError as e:
            raise InvalidInput(str(e), file="--blobs-digest", fix="copy the digest exactly") from None
    if Path(args.blobs).is_dir() or ("/" in args.blobs and not args.blobs.startswith(("oci:", "docker")) and \
            Path(args.blobs).exists()):
        return load_blobs(args.blobs, arch, expect)
    from enclaver_rules.eif.blobs import load_image_blobs
    from enclaver_rules.oci.resolve import resolve

    sources = _sources(args, out, use_engine=True)
    image = resolve(args.blobs, sources, file="--blobs")
    return load_image_blobs(sources.store, image, arch, expect, ref=args.blobs)


def _build_defaults(args: argparse.Namespace) -> None:
    """Flag > manifest `build` block (with ENC_BUILD_*) > built-in default, for the build choices."""
    values = {"build.backend": "pure", "build.blobs": str(DEFAULT_BLOBS), "build.nitro_cli_image": None}
    base = Path.cwd()
    if args.file:
        from enclaver_rules.manifest import resolve as resolve_config

        config = resolve_config(args.file, {}, os.environ)
        config.require_manifest()
        for v in config.values:
            if v.setting.key in values and v.value is not None:
                values[v.setting.key] = v.value
                if v.setting.key == "build.blobs" and v.origin == "file":
                    base = Path(args.file).resolve().parent
    args.backend = args.backend or values["build.backend"]
    if args.blobs is None:
        blobs = str(values["build.blobs"])
        args.blobs = str(base / blobs) if (base / blobs).exists() and not Path(blobs).is_absolute() else blobs
    args.nitro_cli_image = args.nitro_cli_image or values["build.nitro_cli_image"]


def run_build(args: argparse.Namespace, out: Output) -> int:
    from rich.text import Text

    from enclaver_rules.cli.progress import reporter
    from enclaver_rules.eif.blobs import image_arch
    from enclaver_rules.eif.build import build_eif
    from enclaver_rules.eif.sign import Signer
    from enclaver_rules.oci.layer import source_date_epoch
    from enclaver_rules.oci.resolve import resolve

    _build_defaults(args)

    if bool(args.signing_certificate) != bool(args.signing_key):
        raise InvalidInput("--signing-certificate and --signing-key go together", file="--signing-key",
                           fix="give both, or neither")
    signer = Signer.load(args.signing_certificate, args.signing_key) if args.signing_certificate else None
    sources = _sources(args, out, use_engine=True)
    if args.backend == "nitro-cli":
        return _build_with_nitro_cli(args, out, sources)
    with reporter(out.err, not out.quiet) as progress:
        sources.reporter = progress
        image = resolve(args.image, sources, file="--image")
        arch = image_arch(image)
        blobs = _blobs(args, arch, out)
        advance = progress.task(f"eif {args.output}", None)
        result = build_eif(image, sources.store, blobs, args.output, epoch=source_date_epoch(),
                           image_name=args.image_name, signer=signer, progress=advance)
    if blobs.development:
        out.note(f"warning: built from a development blob set ({blobs.root}): this EIF cannot run on Nitro",
                 style="yellow")
    if args.json:
        out.json(result.to_json())
    else:
        out.line(Text(f"Enclave image written: {result.path} ({result.size / 1e6:.1f} MB, {arch})", style="bold"))
        for key, value in result.measurements.to_json().items():
            out.line(f"  {key:<14} {value}")
        out.line(Text(f"  blobs          {blobs.root} ({blobs.digest})", style="dim"))
    return ExitCode.OK


def _build_with_nitro_cli(args: argparse.Namespace, out: Output, sources: Sources) -> int:
    """Upstream's path: the image goes into the engine under a build tag, nitro-cli builds from it."""
    from rich.text import Text

    from enclaver_rules.cli.progress import reporter
    from enclaver_rules.eif import nitro_cli
    from enclaver_rules.oci.resolve import resolve

    with reporter(out.err, not out.quiet) as progress:
        sources.reporter = progress
        image = resolve(args.image, sources, file="--image")
    signing = (Path(args.signing_certificate), Path(args.signing_key)) if args.signing_certificate else None
    run = nitro_cli.build_stored(image, sources.store, Path(args.output),
                                 nitro_cli_image=args.nitro_cli_image or nitro_cli.DEFAULT_IMAGE, signing=signing)
    doc = {"Measurements": run.measurements.to_json(), "eif": args.output, "backend": "nitro-cli",
           "size": Path(args.output).stat().st_size, "image": {"name": image.name, "digest": str(image.digest)}}
    if args.json:
        out.json(doc)
    else:
        out.line(Text(f"Enclave image written by nitro-cli: {args.output}", style="bold"))
        for key, value in run.measurements.to_json().items():
            out.line(f"  {key:<14} {value}")
    return ExitCode.OK


def run_describe(args: argparse.Namespace, out: Output) -> int:
    from rich.text import Text

    from enclaver_rules.eif.describe import describe

    info = describe(args.file)
    ok = info["CheckCRC"] and info.get("SignatureCheck", True)
    if args.json:
        out.json(info)
    else:
        out.line(Text(json.dumps({k: v for k, v in info.items() if k != "Sections"}, indent=2)))
        for s in info["Sections"]:
            out.line(Text(f"  {s['Type']:<10} offset {s['Offset']:>12,}  size {s['Size']:>12,}", style="dim"))
    if not info["CheckCRC"]:
        out.note(f"{args.file}: the CRC does not match: the file was modified or is corrupt", style="red")
    if not info.get("SignatureCheck", True):
        out.note(f"{args.file}: the signature does not verify against PCR0", style="red")
    return ExitCode.OK if ok else ExitCode.FAILURE


def run_dev(args: argparse.Namespace, out: Output) -> int:
    from enclaver_rules.eif.blobs import write_dev_blobs

    blobs = write_dev_blobs(args.output, args.arch)
    if args.json:
        out.json(blobs.to_json())
    else:
        out.line(f"{blobs.root}  {blobs.arch}  {blobs.digest}  (development: cannot boot)")
    return ExitCode.OK
