"""What the guides' scripts (examples/no-fly-list/run.py, examples/vault/run.py) have in common: running a
step and showing it as a user would type it, the build and trust steps, `enclaver kms serve` and the
other background services, and a running `enclaver run`'s output.

One module so that a fix to how a step is run, shown or stopped reaches both guides: their READMEs quote
the scripts' output, which must stay the same line for line. Each script puts examples/ on sys.path and
imports this module; it keeps only what its own guide does.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

REPO = Path(__file__).resolve().parent.parent
ACCOUNT, REGION = "111122223333", "us-east-1"  # the simulator's (`enclaver run --sim-kms` uses them too)
ADMIN = f"arn:aws:iam::{ACCOUNT}:role/enclaver-sim-admin"  # the key's administrator
PARENT_ROLE = "enclaver-sim-parent"
PARENT = f"arn:aws:iam::{ACCOUNT}:role/{PARENT_ROLE}"  # the parent's instance role, which the simulator's IMDS hands out
ENCLAVER = [sys.executable, "-m", "enclaver_rules.cli"]
TIMEOUT = 300.0  # a bound for each wait, so a broken step fails instead of hanging


class GuideError(Exception):
    """A step failed: the script prints it and exits 1 (no traceback: the message says what to do)."""


def step(text: str) -> None:
    """A step's heading, as the guides number them."""
    print(f"\n==> {text}", flush=True)


def shown(argv: Sequence[str | Path]) -> list[str]:
    """The command as a user would type it (`enclaver …`, `doit …`): what is printed is what to copy."""
    args = [str(a) for a in argv]
    if args[:3] == ENCLAVER:
        return ["enclaver", *args[3:]]
    if args[:3] == [sys.executable, "-m", "doit"]:
        return ["doit", *args[3:]]
    return args


def show(argv: Sequence[str | Path], hidden: Sequence[str] = (), *, background: bool = False) -> None:
    """Print `$ COMMAND` (with ` &` when it keeps running), each of `hidden` (credentials) as ***."""
    text = " ".join(shown(argv))
    for secret in hidden:
        text = text.replace(secret, "***")
    print(f"$ {text}" + (" &" if background else ""), flush=True)


def run(argv: Sequence[str | Path], cwd: Path, env: dict[str, str], *, echo: bool, data: bool = True,
        check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a step; with `echo`, show it and what it says (stdout too, unless it is the step's `data`).
    GuideError when it fails and `check`."""
    if echo:
        show(argv)
    result = subprocess.run([str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)
    if echo and not data and result.stdout.strip():
        print(result.stdout.rstrip(), flush=True)
    if echo and result.stderr.strip():
        print(result.stderr.rstrip(), flush=True)
    if check and result.returncode != 0:
        raise GuideError(f"{' '.join(shown(argv))} exited {result.returncode}:\n{result.stdout}{result.stderr}")
    return result


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on now (for a service or a published port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_of(url: str) -> int:
    """The port of `http://HOST:PORT[/]`."""
    return int(url.rstrip("/").rsplit(":", 1)[1])


# -- the steps both guides take --------------------------------------------------------------------------


@dataclass
class GuideSteps:
    """A guide's steps in one checkout (`repo`: dodo.py and examples/), state under `work`. A guide
    subclasses it with its defaults for `repo` and `work` and the class variables below."""

    repo: Path
    work: Path
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    echo: bool = True

    #: variables dropped from the environment, so a step never reaches a real AWS (or Vault) by accident
    dropped_env: ClassVar[tuple[str, ...]] = ("AWS_",)
    #: the doit tasks that make the app image and the blob set
    doit_tasks: ClassVar[tuple[str, ...]] = ()
    #: the enclave's manifest, relative to the checkout
    manifest: ClassVar[str] = ""
    #: what the administrator may do besides `enclaver trust --kms-policy`'s statements, which let nobody
    #: outside the enclave have plaintext: the guide's one operation that makes the enclave's secret
    operator_statement: ClassVar[dict[str, Any]] = {}

    def __post_init__(self) -> None:
        self.env = {k: v for k, v in self.env.items() if not k.startswith(self.dropped_env)}
        self.work.mkdir(parents=True, exist_ok=True)

    def build(self, manifest: str | None = None) -> Path:
        """The app image and blob set, then the enclave (`manifest`, relative to the checkout; default the
        guide's): its build directory (cache/out/NAME/<key>, which a later build does not replace)."""
        run([sys.executable, "-m", "doit", *self.doit_tasks], self.repo, self.env, echo=self.echo, data=False)
        built = json.loads(run([*ENCLAVER, "build", "-f", manifest or self.manifest, "--json"], self.repo, self.env,
                               echo=self.echo).stdout)
        if self.echo:
            for name, value in sorted(built["Measurements"].items()):
                print(f"  {name} {value}")
        return Path(built["outputs"]["directory"])

    def key_policy(self, source: Path) -> dict[str, Any]:
        """`enclaver trust SOURCE --kms-policy` (SOURCE: a build directory or a measurements.json) for the
        simulator's account and roles, plus the guide's `operator_statement`; written to WORK/policy.json
        and, with `echo`, described."""
        made = run([*ENCLAVER, "trust", str(source), "--kms-policy", "--account", ACCOUNT, "--admin", ADMIN,
                    "--principal", PARENT], self.repo, self.env, echo=self.echo)
        policy: dict[str, Any] = json.loads(made.stdout)
        policy["Statement"].append(dict(self.operator_statement))
        (self.work / "policy.json").write_text(json.dumps(policy, indent=2) + "\n")
        if self.echo:
            print(f"  {self.work / 'policy.json'}:")
            for line in describe_policy(policy):
                print(f"    {line}")
        return policy

    def check_docker(self) -> None:
        """Fail now, not after the build, when there is no Docker engine."""
        import docker

        try:
            client = docker.from_env()
            client.ping()
            client.close()
        except Exception as e:  # whatever the SDK raises, the fix is the same
            raise GuideError(f"no Docker engine ({e}): start one (systemctl start docker) or set DOCKER_HOST") from e

    def build_and_trust(self, refused: bool) -> tuple[Path, dict[str, Any]]:
        """The guides' steps 1 and 2: the build directory and the key policy (with `refused`, a policy
        for another PCR0, so that KMS refuses the enclave)."""
        self.check_docker()
        step("1. build the app image and the enclave")
        build_dir = self.build()
        step("2. the KMS key policy that lets only this enclave decrypt")
        source = other_measurements(build_dir, self.work / "other-measurements.json") if refused else build_dir
        if refused:
            print(f"  (--refused: the policy is written for {source}, whose PCR0 is not this build's)")
        return build_dir, self.key_policy(source)


def other_measurements(build_dir: Path, where: Path) -> Path:
    """The build's measurements with another PCR0, as another build of the app would have."""
    measurements = json.loads((build_dir / "measurements.json").read_text())
    pcr0 = measurements["Measurements"]["PCR0"]
    measurements["Measurements"]["PCR0"] = ("0" if pcr0[0] != "0" else "1") + pcr0[1:]
    where.write_text(json.dumps(measurements, indent=2) + "\n")
    return where


def describe_policy(policy: dict[str, Any]) -> list[str]:
    """One line per statement: who may (or may not) do what, and when."""
    lines = []
    for statement in policy["Statement"]:
        principal = statement["Principal"]
        who = "everyone" if principal == "*" else principal["AWS"]
        actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
        when = "".join(f" when {key} {operator} {value if isinstance(value, str) else ' or '.join(value)}"
                       for operator, keys in statement.get("Condition", {}).items() for key, value in keys.items())
        lines.append(f"{statement['Sid']}: {statement['Effect']} {', '.join(actions)} for {who}{when}")
    return lines


# -- the local KMS and other services --------------------------------------------------------------------


def access_key(prefix: str, random_bytes: int) -> tuple[str, str]:
    """A fresh (access key id, secret key) for one session's identity in the local KMS: never a real one."""
    return prefix + secrets.token_hex(random_bytes).upper(), secrets.token_urlsafe(30)


def kms_serve_argv(state: Path, identities: Sequence[tuple[tuple[str, str], str]], *, verbose: bool = False,
                   extra: Sequence[str] = ()) -> list[str]:
    """`enclaver kms serve` on `state` (any free port) for the simulator's account and region, with one
    `--identity` per (access key, role ARN), then `extra`."""
    argv = [*ENCLAVER, "kms", "serve", *(["-v"] if verbose else []), "--state", str(state), "--port", "0",
            "--region", REGION, "--account", ACCOUNT]
    for (akid, secret), arn in identities:
        argv += ["--identity", f"{akid}:{secret}={arn}"]
    return [*argv, *extra]


def wait_kms(kms: Service) -> tuple[str, str]:
    """Until `enclaver kms serve` says it is ready: (that line, its endpoint URL)."""
    line = kms.wait_line(lambda text: text.startswith("ready "), "the local KMS")
    return line, line.split()[1]


def kms_client(endpoint: str, key: tuple[str, str]) -> Any:
    """A boto3 KMS client for the local KMS, signing as the identity `key` (imported here: boto3 is slow
    to load, and the scripts' --help should not wait for it)."""
    import boto3

    return boto3.client("kms", endpoint_url=endpoint, region_name=REGION, aws_access_key_id=key[0],
                        aws_secret_access_key=key[1])


class Service:
    """A child process whose stdout is collected in a file; terminated (then killed) at the end."""

    def __init__(self, argv: Sequence[str], log: Path, env: dict[str, str]) -> None:
        self.argv, self.log, self.env = list(argv), log, env
        self.out = log.with_suffix(".out")

    def __enter__(self) -> Service:
        with open(self.out, "wb") as out, open(self.log, "ab") as err:
            self.process = subprocess.Popen(self.argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=self.env)
        return self

    def wait_line(self, done: Callable[[str], bool], what: str) -> str:
        """The first line of its stdout for which `done` holds; GuideError if it ends first or takes too long."""
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            for line in self.out.read_text(errors="replace").splitlines():
                if done(line):
                    return line
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        raise GuideError(f"{what} did not start (exit {self.process.poll()}): "
                         f"{self.log.read_text(errors='replace')[-2000:]}")

    def __exit__(self, *exc: object) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


# -- a running `enclaver run` ------------------------------------------------------------------------------


class EnclaveProcess:
    """A running `enclaver run`: its output collected (and, with `echo`, printed with a prefix per stream)
    line by line, so that a test can read it and a user sees it as it comes."""

    def __init__(self, process: subprocess.Popen[bytes], echo: bool, out_prefix: str, err_prefix: str) -> None:
        self.process, self.echo = process, echo
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self.code: int | None = None
        self._pumps = [threading.Thread(target=self._pump, args=(stream, into, prefix), daemon=True)
                       for stream, into, prefix in ((process.stdout, self.stdout, out_prefix),
                                                    (process.stderr, self.stderr, err_prefix))]
        for pump in self._pumps:
            pump.start()

    def _pump(self, stream: Any, into: list[str], prefix: str) -> None:
        for raw in stream:
            line = raw.decode(errors="replace").rstrip("\n")
            into.append(line)
            if self.echo:
                print(prefix + line, flush=True)

    @property
    def output(self) -> str:
        return "\n".join(self.stdout) + "\n" + "\n".join(self.stderr)

    def wait(self, timeout: float = TIMEOUT) -> int:
        """`enclaver run`'s exit code, once it ended by itself."""
        self.code = self.process.wait(timeout)
        for pump in self._pumps:
            pump.join(30)
        return self.code

    def signal(self) -> None:
        """SIGTERM, if it still runs: odyn passes it to the app, which stops; the logs are drained."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def stop(self) -> int:
        """SIGTERM, then its exit code (killed if it does not end in time)."""
        self.signal()
        try:
            return self.wait()
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.wait()


# -- the command line ---------------------------------------------------------------------------------------


def parser(doc: str | None) -> argparse.ArgumentParser:
    """The script's parser: its docstring's first paragraph as the description. The script adds its
    options (--work with `add_work`), in the order its --help has always shown them."""
    return argparse.ArgumentParser(description=(doc or "").split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def add_work(parser: argparse.ArgumentParser, work: str) -> None:
    """--work DIR: where the guide keeps its state (default cache/WORK)."""
    parser.add_argument("--work", type=Path, default=REPO / "cache" / work,
                        help=f"where the guide keeps its state (default: cache/{work})")


def guided(steps: Callable[[], int | None]) -> int:
    """Run the guide's `steps`: their exit code if they return one (they stopped early on purpose), else 0
    and the time taken; a GuideError is printed, and 1."""
    started = time.monotonic()
    try:
        code = steps()
    except GuideError as e:
        print(f"\nrun.py: {e}", file=sys.stderr)
        return 1
    if code is not None:
        return code
    print(f"\ndone in {time.monotonic() - started:.0f} s")
    return 0
