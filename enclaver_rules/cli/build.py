"""`enclaver build`: the rule set's tasks for one manifest, run through doit as a library."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from enclaver_rules.cli.exit_codes import ExitCode
from enclaver_rules.cli.options import Subparsers, add_json, epilog
from enclaver_rules.errors import InvalidInput, OperationFailed

if TYPE_CHECKING:
    from enclaver_rules.cli.output import Output

CODES = {
    ExitCode.OK: "built (or already up to date); the summary was printed",
    ExitCode.FAILURE: "a step failed (an image or blob set could not be read, the disk, a service)",
    ExitCode.INVALID_INPUT: "the manifest or an argument is invalid",
}


def add_parser(commands: Subparsers[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    parser = commands.add_parser(
        "build", parents=[common], help="build an enclave: enclave image, EIF, measurements, release image, policy",
        description="Run the rule set's tasks for one manifest (check, odyn_image, resolve, layer, eif, release, trust) through "
                    "doit, sharing `doit build`'s cache and state: nothing already built is built again. Ends by "
                    "printing the release image's digest and tag, the PCRs, and where the outputs are.",
        epilog=epilog(CODES), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(func=run, exit_codes=CODES)
    parser.add_argument("-f", "--file", default="enclaver.yaml", metavar="FILE", help="the manifest (default: "
                        "enclaver.yaml)")
    parser.add_argument("--eif-only", metavar="FILE", help="also copy the EIF to FILE")
    parser.add_argument("--backend", choices=["pure", "nitro-cli"],
                        help="how to build the EIF (overrides build.backend and ENC_BUILD_BACKEND): `pure` needs no "
                             "Docker engine; `nitro-cli` runs build.nitro_cli_image through the engine at DOCKER_HOST")
    parser.add_argument("--push", action="store_true",
                        help="push the release image to `target`, with its measurements and KMS key policy attached "
                             "as OCI referrers")
    parser.add_argument("--remote-cache", metavar="REGISTRY/REPO",
                        help="share EIF builds through this registry repository: fetch an entry for the build's key "
                             "before building (checked, refused if it is not what these inputs give), store what "
                             "was built (or $ENC_REMOTE_CACHE)")
    parser.add_argument("--remote-cache-read-only", action="store_true",
                        help="fetch from the remote cache but never store into it (or $ENC_REMOTE_CACHE_READ_ONLY=1)")
    parser.add_argument("--remote-cache-check-pcrs", action="store_true",
                        help="also recompute a fetched EIF's PCR0 and PCR2 from its bytes (two SHA-384 passes over "
                             "the application ramdisk; by default they are taken from the entry's record) "
                             "(or $ENC_REMOTE_CACHE_CHECK_PCRS=1)")
    parser.add_argument("--cache-dir", metavar="DIR", help="the store and outputs (default: $ENC_CACHE_DIR, else "
                        "cache/ beside the nearest dodo.py, else ~/.cache/enclaver)")
    add_json(parser)


class _Reporter:
    """doit reporter that says, one line per task, what ran and what was up to date (rich, on stderr),
    and keeps the failures so the command can report them with its own exit code."""

    def __init__(self, out: Output, failures: list[tuple[str, str]]) -> None:
        self.out = out
        self.failures = failures
        self.started: dict[str, float] = {}

    def initialize(self, tasks: Any, selected_tasks: Any) -> None:
        pass

    def get_status(self, task: Any) -> None:
        pass

    def execute_task(self, task: Any) -> None:
        if task.actions and not task.name.startswith("_"):
            self.started[task.name] = time.monotonic()
            self.out.note(f"… {task.name}", style="cyan")

    def add_success(self, task: Any) -> None:
        if task.name in self.started:
            self.out.note(f"✓ {task.name} ({time.monotonic() - self.started[task.name]:.1f} s)", style="green")

    def add_failure(self, task: Any, fail: Any) -> None:
        self.failures.append((task.name, fail.message if hasattr(fail, "message") else str(fail)))

    def skip_uptodate(self, task: Any) -> None:
        if task.actions and ":" in task.name:
            self.out.note(f"= {task.name} (up to date)", style="dim")

    def skip_ignore(self, task: Any) -> None:
        pass

    def cleanup_error(self, exception: Any) -> None:
        self.failures.append(("cleanup", str(exception)))

    def runtime_error(self, msg: str) -> None:
        self.failures.append(("doit", msg))

    def teardown_task(self, task: Any) -> None:
        pass

    def complete_run(self) -> None:
        pass


def run_rule_set(path: Path, name: str, cache: Path, task: str, out: Output, env: dict[str, str] | None = None) -> int:
    """Run `task` (and what it depends on) for the manifest at `path` through doit; report failures."""
    from doit.cmd_base import ModuleTaskLoader
    from doit.doit_cmd import DoitMain

    from enclaver_rules.cli.progress import reporter
    from enclaver_rules.rules import tasks
    from enclaver_rules.rules.common import set_reporter
    from enclaver_rules.rules.discover import Enclave

    failures: list[tuple[str, str]] = []

    class Reporter(_Reporter):  # doit makes its reporter from a class and (outstream, options)
        def __init__(self, outstream: Any, options: Any) -> None:
            super().__init__(out, failures)

    rules = tasks(str(path.resolve().parent), enclaves=[Enclave(name, str(path.resolve()))], cache_dir=str(cache))
    # the rule set's own config (state file in this cache), drawn by our reporter instead of doit's
    config_doit = {**rules["DOIT_CONFIG"], "reporter": Reporter, "verbosity": 0}
    loader = ModuleTaskLoader({**rules, "DOIT_CONFIG": config_doit})
    saved = dict(os.environ)
    os.environ.update(env or {})
    try:
        # what the tasks print (the odyn build's progress, …) goes to stderr with the notes: stdout holds
        # only the command's data (--json: one document)
        with reporter(out.err, not out.quiet) as bars, contextlib.redirect_stdout(out.stderr):  # bars: a terminal
            set_reporter(bars)
            code = DoitMain(loader).run([task])
    finally:
        set_reporter(None)
        os.environ.clear()
        os.environ.update(saved)
    if code == 0:
        return ExitCode.OK
    for failed, message in failures:
        out.note(f"{failed}: {message.strip()}", style="red")
    return ExitCode.INVALID_INPUT if any(t.startswith("check:") for t, _ in failures) else ExitCode.FAILURE


def run(args: argparse.Namespace, out: Output) -> int:
    from rich.text import Text

    from enclaver_rules.manifest import resolve as resolve_config
    from enclaver_rules.oci.store import default_cache_dir
    from enclaver_rules.rules.common import BUILD, POLICY, latest_dir
    from enclaver_rules.rules.eif import LOCAL

    path = Path(args.file)
    if not path.is_file():
        raise InvalidInput(f"{args.file}: no such file", file=args.file, fix="pass the manifest with -f FILE")
    config = resolve_config(str(path), {"build.backend": args.backend}, os.environ)
    manifest = config.require_manifest()
    cache = Path(args.cache_dir) if args.cache_dir else default_cache_dir(str(path.resolve().parent))
    env = {}
    if args.backend:  # a flag beats ENC_BUILD_BACKEND and the manifest (the foundation's precedence)
        env["ENC_BUILD_BACKEND"] = args.backend
    if args.remote_cache:
        env["ENC_REMOTE_CACHE"] = args.remote_cache
    if args.remote_cache_read_only:
        env["ENC_REMOTE_CACHE_READ_ONLY"] = "1"
    if args.remote_cache_check_pcrs:
        env["ENC_REMOTE_CACHE_CHECK_PCRS"] = "1"
    # the KMS key policy needs the account that owns the key, which has no default: without
    # ENC_KMS_ACCOUNT the build stops at the release image and says how to get the policy
    policy_wanted = args.push or bool(os.environ.get("ENC_KMS_ACCOUNT"))
    step = "push" if args.push else "trust" if policy_wanted else "build"
    code = run_rule_set(path, manifest.name, cache, f"{step}:{manifest.name}", out, env)
    if code != ExitCode.OK:
        return code
    latest = latest_dir(str(cache), manifest.name)
    summary: dict[str, Any] = json.loads((latest / BUILD).read_text())
    outputs = {"directory": str(latest), "eif": str(latest / "application.eif"),
               "measurements": str(latest / "measurements.json")}
    if policy_wanted:
        outputs["policy"] = str(latest / POLICY)
    pushed = latest / "pushed.json"
    if args.push and pushed.is_file():
        outputs["pushed"] = str(pushed)
    if args.eif_only:
        target = Path(args.eif_only)
        partial = target.with_name(target.name + ".partial")
        try:
            shutil.copyfile(latest / "application.eif", partial)
            os.replace(partial, target)
        except OSError as e:
            raise OperationFailed(f"cannot write {target}: {e.strerror}", file=str(target)) from None
        outputs["eif_copy"] = str(target)
    try:
        origin = json.loads((latest / LOCAL).read_text())["origin"]
    except (OSError, ValueError, KeyError):
        origin = "unknown"
    document = {"name": manifest.name, "release_image": {"tag": summary["target"], "digest": summary["release_image"]},
                "enclave_image": summary["enclave_image"], "Measurements": summary["measurements"],
                "development": summary["development"], "eif_origin": origin, "outputs": outputs}
    if args.json:
        out.json(document)
        return ExitCode.OK
    out.line(Text(f"release image {summary['target']}  {summary['release_image']}", style="bold"))
    for pcr, value in summary["measurements"].items():
        out.line(f"{pcr}  {value}")
    if origin != "built":
        out.note(f"the EIF came from the {origin}", style="cyan")
    if summary["development"]:
        out.note("built with a development blob set: these PCRs are for trying the pipeline, not for AWS",
                 style="yellow")
    for what, where in outputs.items():
        out.line(Text(f"{what:<13} {where}", style="dim"))
    if not policy_wanted:
        out.note("no KMS key policy: set ENC_KMS_ACCOUNT=<12-digit AWS account ID> and build again, or run "
                 f"`enclaver trust {latest} --kms-policy --account ID`")
    return ExitCode.OK
