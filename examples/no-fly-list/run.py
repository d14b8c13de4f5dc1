#!/usr/bin/env python3
"""The no-fly-list guide end to end on this machine: the enclave in the simulator, a local KMS that
enforces the key policy's attestation condition, and a local S3 server (moto's).

    .venv/bin/python examples/no-fly-list/run.py            # every step, then ask about a few passengers
    .venv/bin/python examples/no-fly-list/run.py --serve    # ... and keep serving on localhost:8001
    .venv/bin/python examples/no-fly-list/run.py --refused  # a key policy for other PCRs: the app is refused

The steps, each the guide's, each printed as it runs:

1. build: the app image (`doit examples:no-fly-list examples:blobs`: Debian's python3 + boto3 by
   mmdebstrap, so as root) and the enclave (`enclaver build -f examples/no-fly-list/enclaver.sim.yaml`),
   which prints the PCRs;
2. trust: `enclaver trust BUILD --kms-policy`, the key policy that lets only this PCR0 decrypt;
3. the key: the local KMS (`enclaver kms serve --state STATE`) creates a key under that policy
   (boto3, as the key's administrator), and the list (no-fly-list.txt) is sealed: a fresh data key
   encrypts it, KMS Encrypt wraps the data key; the envelope goes to the S3 server (`moto_server`);
4. run: `enclaver run --simulate BUILD --sim-kms STATE --sim-host s3.sim.internal=127.0.0.1:PORT
   -p 127.0.0.1:8001:8001`: the app fetches the envelope through egress, and the KMS proxy gets
   the data key for it with the enclave's attestation;
5. ask: `curl 'localhost:8001/enclave/passenger?name=foo'`, for a few names.

Needs: a Docker engine (DOCKER_HOST, else /var/run/docker.sock); root and mmdebstrap for the app
image; moto's server (`pip install 'moto[server]'`, part of `.[test]`). State is kept in
cache/no-fly-list-guide/ (--work): the simulator's CA, the KMS state, the policy and the envelope.
tests/test_guide_no_fly_list.py runs the same functions.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE / "app"))
import no_fly_list  # noqa: E402  (the app's own envelope code seals the list)

MANIFEST = "examples/no-fly-list/enclaver.sim.yaml"
LIST = HERE / "no-fly-list.txt"
S3_NAME = "s3.sim.internal"  # the app image's NO_FLY_LIST_S3_ENDPOINT host (examples/images.py)
BUCKET, OBJECT = "no-fly-list", "no-fly-list.json"  # its NO_FLY_LIST_BUCKET and NO_FLY_LIST_OBJECT
ACCOUNT, REGION = "111122223333", "us-east-1"  # what `enclaver run --sim-kms` uses
ADMIN = f"arn:aws:iam::{ACCOUNT}:role/enclaver-sim-admin"  # the key's administrator
PARENT = f"arn:aws:iam::{ACCOUNT}:role/enclaver-sim-parent"  # the instance role --sim-kms's IMDS hands out
PASSENGERS = ("foo", "Big Bird", "cookie   MONSTER", "Kermit the Frog")
ENCLAVER = [sys.executable, "-m", "enclaver_rules.cli"]
TIMEOUT = 300.0  # a bound for each wait, so a broken step fails instead of hanging


class GuideError(Exception):
    pass


def step(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def _run(argv: Sequence[str], cwd: Path, env: dict[str, str], *, echo: bool,
         data: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a step; with `echo`, show it and what it says (stdout too, unless it is the step's `data`)."""
    if echo:
        print("$ " + " ".join(_shown(argv)), flush=True)
    result = subprocess.run(list(argv), cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)
    if echo and not data and result.stdout.strip():
        print(result.stdout.rstrip(), flush=True)
    if echo and result.stderr.strip():
        print(result.stderr.rstrip(), flush=True)
    if result.returncode != 0:
        raise GuideError(f"{' '.join(_shown(argv))} exited {result.returncode}:\n{result.stdout}{result.stderr}")
    return result


def _shown(argv: Sequence[str]) -> list[str]:
    """The command as a user would type it (`enclaver …`, `doit …`)."""
    argv = list(argv)
    if argv[:3] == ENCLAVER:
        return ["enclaver", *argv[3:]]
    if argv[:3] == [sys.executable, "-m", "doit"]:
        return ["doit", *argv[3:]]
    return argv


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Guide:
    """The guide's steps in one checkout (`repo`: dodo.py and examples/), state under `work`."""

    repo: Path = REPO
    work: Path = REPO / "cache" / "no-fly-list-guide"
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    echo: bool = True

    def __post_init__(self) -> None:
        self.env = {k: v for k, v in self.env.items() if not k.startswith("AWS_")}  # no real AWS by accident
        self.work.mkdir(parents=True, exist_ok=True)

    # 1. build ------------------------------------------------------------------------------------

    def build(self, manifest: str = MANIFEST) -> Path:
        """The app image and blob set, then the enclave (`manifest`, relative to the checkout): its build
        directory (cache/out/NAME/<key>, which a later build does not replace)."""
        _run([sys.executable, "-m", "doit", "examples:no-fly-list", "examples:blobs"], self.repo, self.env,
             echo=self.echo, data=False)
        built = json.loads(_run([*ENCLAVER, "build", "-f", manifest, "--json"], self.repo, self.env,
                                echo=self.echo).stdout)
        if self.echo:
            for name, value in sorted(built["Measurements"].items()):
                print(f"  {name} {value}")
        return Path(built["outputs"]["directory"])

    # 2. trust ------------------------------------------------------------------------------------

    def key_policy(self, source: Path) -> dict[str, Any]:
        """`enclaver trust SOURCE --kms-policy` (SOURCE: a build directory or a measurements.json) for the
        simulator's account and roles, plus one statement that lets the administrator *encrypt* (seal
        the list): enclaver's policy lets nobody outside the enclave decrypt, and nobody encrypt."""
        made = _run([*ENCLAVER, "trust", str(source), "--kms-policy", "--account", ACCOUNT, "--admin", ADMIN,
                     "--principal", PARENT], self.repo, self.env, echo=self.echo)
        policy: dict[str, Any] = json.loads(made.stdout)
        policy["Statement"].append({"Sid": "OperatorMaySealData", "Effect": "Allow", "Principal": {"AWS": ADMIN},
                                    "Action": ["kms:Encrypt"], "Resource": "*"})
        (self.work / "policy.json").write_text(json.dumps(policy, indent=2) + "\n")
        if self.echo:
            print(f"  {self.work / 'policy.json'}:")
            for line in describe_policy(policy):
                print(f"    {line}")
        return policy

    # 3. the key, the envelope, the bucket ----------------------------------------------------------

    def kms_state(self) -> Path:
        return self.work / "kms"

    @contextlib.contextmanager
    def local_kms(self) -> Iterator[Any]:
        """`enclaver kms serve` on the state `enclaver run --sim-kms` will use, with an administrator
        identity for this session; yields a boto3 KMS client signing as it. Stopped at the end."""
        import secrets

        import boto3

        akid, secret = "AKIAGUIDE" + secrets.token_hex(6).upper(), secrets.token_urlsafe(30)
        argv = [*ENCLAVER, "kms", "serve", "--state", str(self.kms_state()), "--port", "0", "--region", REGION,
                "--account", ACCOUNT, "--identity", f"{akid}:{secret}={ADMIN}"]
        if self.echo:
            print("$ " + " ".join(_shown(argv)).replace(secret, "***"), flush=True)
        with _Service(argv, self.work / "kms-setup.log", self.env) as kms:
            line = kms.wait_line(lambda text: text.startswith("ready "), "the local KMS")
            endpoint = line.split()[1]
            if self.echo:
                print(f"  {line}")
            yield boto3.client("kms", endpoint_url=endpoint, region_name=REGION, aws_access_key_id=akid,
                               aws_secret_access_key=secret)

    def provision(self, policy: dict[str, Any], s3_endpoint: str, names: Sequence[str]) -> str:
        """A new KMS key under `policy` (a fresh KMS state), the list sealed under it and uploaded to
        the bucket: the key's id."""
        shutil.rmtree(self.kms_state(), ignore_errors=True)
        with self.local_kms() as kms:
            key_id = str(kms.create_key(Policy=json.dumps(policy), Description="the no-fly list")["KeyMetadata"]
                         ["KeyId"])
            envelope = no_fly_list.seal_with_kms(names, kms, key_id)
        (self.work / OBJECT).write_text(json.dumps(envelope, indent=2) + "\n")
        upload(s3_endpoint, envelope)
        if self.echo:
            print(f"  key {key_id}; {len(names)} names sealed (AES-256-GCM, the data key wrapped by KMS Encrypt); "
                  f"envelope {self.work / OBJECT} → s3://{BUCKET}/{OBJECT}")
            shown = {k: v if k == "format" else f"{v[:12]}… ({len(v)} characters)" for k, v in envelope.items()}
            print(f"  the envelope: {json.dumps(shown, ensure_ascii=False)}")
        return key_id

    # 4. run ------------------------------------------------------------------------------------

    def run_argv(self, build_dir: Path | str, s3_port: int | None, host_port: int,
                 extra: Sequence[str] = ()) -> list[str]:
        """`build_dir`: or any IMAGE|EIF `enclaver run` takes; `s3_port` None: no --sim-host for S3;
        `extra`: more flags (--debug-mode, --verify-before-run FILE)."""
        s3 = ["--sim-host", f"{S3_NAME}=127.0.0.1:{s3_port}"] if s3_port is not None else []
        return [*ENCLAVER, "run", "--simulate", str(build_dir), "--sim-kms", str(self.kms_state()),
                "--sim-state", str(self.work / "sim-ca"), *s3, "-p", f"127.0.0.1:{host_port}:8001", *extra]

    @contextlib.contextmanager
    def enclave(self, build_dir: Path | str, s3_port: int | None, host_port: int,
                extra: Sequence[str] = ()) -> Iterator[Enclave]:
        """`enclaver run --simulate …` until the block ends (then SIGTERM, and its output drained)."""
        argv = self.run_argv(build_dir, s3_port, host_port, extra)
        if self.echo:
            print("$ " + " ".join(_shown(argv)), flush=True)
        enclave = Enclave(subprocess.Popen(argv, cwd=self.repo, env=self.env, stdout=subprocess.PIPE,
                                           stderr=subprocess.PIPE), host_port, self.echo)
        try:
            yield enclave
        finally:
            enclave.stop()

    def check_docker(self) -> None:
        """Fail now, not after the build, when there is no Docker engine."""
        import docker

        try:
            client = docker.from_env()
            client.ping()
            client.close()
        except Exception as e:  # whatever the SDK raises, the fix is the same
            raise GuideError(f"no Docker engine ({e}): start one (systemctl start docker) or set DOCKER_HOST") from e


class Enclave:
    """A running `enclaver run`: its output collected (and echoed) line by line."""

    def __init__(self, process: subprocess.Popen[bytes], port: int, echo: bool) -> None:
        self.process, self.port, self.echo = process, port, echo
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self.code: int | None = None
        self._pumps = [threading.Thread(target=self._pump, args=(stream, into, prefix), daemon=True)
                       for stream, into, prefix in ((process.stdout, self.stdout, "  enclave | "),
                                                    (process.stderr, self.stderr, "  run     | "))]
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

    def wait_serving(self, timeout: float = TIMEOUT) -> None:
        """Until the app answers on the published port; GuideError if `enclaver run` ends first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.wait()
                raise GuideError(f"enclaver run exited {self.code} before the app served:\n{self.output}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=5) as reply:
                    if reply.status == 200:
                        return
            except (OSError, ValueError):
                time.sleep(0.5)
        raise GuideError(f"the app did not serve within {timeout:.0f} s:\n{self.output}")

    def ask(self, name: str) -> str:
        """`curl 'localhost:PORT/enclave/passenger?name=NAME'`."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{passenger_path(name)}", timeout=30) as reply:
            return str(reply.read().decode().strip())

    def wait(self, timeout: float = TIMEOUT) -> int:
        """`enclaver run`'s exit code, once it ended by itself."""
        self.code = self.process.wait(timeout)
        for pump in self._pumps:
            pump.join(30)
        return self.code

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # odyn stops the app; the logs are drained
        try:
            return self.wait()
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.wait()


class _Service:
    """A child process whose stdout is collected in a file; terminated (then killed) at the end."""

    def __init__(self, argv: Sequence[str], log: Path, env: dict[str, str]) -> None:
        self.argv, self.log, self.env = list(argv), log, env
        self.out = log.with_suffix(".out")

    def __enter__(self) -> _Service:
        with open(self.out, "wb") as out, open(self.log, "ab") as err:
            self.process = subprocess.Popen(self.argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=self.env)
        return self

    def wait_line(self, done: Any, what: str) -> str:
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


@contextlib.contextmanager
def s3_server(work: Path, env: dict[str, str] | None = None, echo: bool = False) -> Iterator[tuple[str, int]]:
    """moto's S3 server (`moto_server -H 127.0.0.1 -p PORT`) until the block ends: (endpoint, port).
    MOTO_S3_CUSTOM_ENDPOINTS tells it that s3.sim.internal is the endpoint (path-style buckets), not a
    bucket named s3."""
    port = free_port()
    argv = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    if echo:
        print(f"$ MOTO_S3_CUSTOM_ENDPOINTS=http://{S3_NAME} moto_server -H 127.0.0.1 -p {port}", flush=True)
    moto_env = {**(env or os.environ), "PYTHONUNBUFFERED": "1", "MOTO_S3_CUSTOM_ENDPOINTS": f"http://{S3_NAME}"}
    with _Service(argv, work / "moto.log", moto_env) as moto:
        endpoint = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + TIMEOUT
        while True:
            try:
                with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=5):
                    break
            except urllib.error.HTTPError:
                break  # it answers
            except OSError as e:
                if moto.process.poll() is not None or time.monotonic() > deadline:
                    raise GuideError(f"moto_server did not start ({e}): "
                                     f"{moto.log.read_text(errors='replace')[-2000:]}") from e
                time.sleep(0.2)
        yield endpoint, port


def upload(endpoint: str, envelope: dict[str, str]) -> None:
    """The envelope into s3://BUCKET/OBJECT (moto takes any credentials)."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint, region_name=REGION, aws_access_key_id="guide",
                      aws_secret_access_key="guide")
    with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou):
        s3.create_bucket(Bucket=BUCKET)
    s3.put_object(Bucket=BUCKET, Key=OBJECT, Body=json.dumps(envelope).encode(), ContentType="application/json")


def other_measurements(build_dir: Path, where: Path) -> Path:
    """The build's measurements with another PCR0, as another build of the app would have."""
    measurements = json.loads((build_dir / "measurements.json").read_text())
    pcr0 = measurements["Measurements"]["PCR0"]
    measurements["Measurements"]["PCR0"] = ("0" if pcr0[0] != "0" else "1") + pcr0[1:]
    where.write_text(json.dumps(measurements, indent=2) + "\n")
    return where


def passenger_path(name: str) -> str:
    return "/enclave/passenger?" + urllib.parse.urlencode({"name": name}, quote_via=urllib.parse.quote)


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


def read_names(path: Path = LIST) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=8001, help="the host port for the app (default 8001)")
    parser.add_argument("--work", type=Path, default=REPO / "cache" / "no-fly-list-guide",
                        help="where the guide keeps its state (default: cache/no-fly-list-guide)")
    parser.add_argument("--ask", action="append", metavar="NAME", help=f"a passenger to ask about (repeat; "
                        f"default: {', '.join(PASSENGERS)})")
    parser.add_argument("--serve", action="store_true", help="keep the enclave serving until Ctrl-C")
    parser.add_argument("--refused", action="store_true",
                        help="use a key policy for other PCRs: the enclave is refused the data key")
    args = parser.parse_args(argv)
    guide = Guide(work=args.work.resolve())
    started = time.monotonic()
    try:
        guide.check_docker()
        step("1. build the app image and the enclave")
        build_dir = guide.build()
        step("2. the KMS key policy that lets only this enclave decrypt")
        source = other_measurements(build_dir, guide.work / "other-measurements.json") if args.refused else build_dir
        if args.refused:
            print(f"  (--refused: the policy is written for {source}, whose PCR0 is not this build's)")
        policy = guide.key_policy(source)
        with s3_server(guide.work, guide.env, echo=True) as (s3_endpoint, s3_port):
            step("3. create the key in the local KMS, seal the list, upload it to S3")
            guide.provision(policy, s3_endpoint, read_names())
            step("4. run the enclave in the simulator")
            with guide.enclave(build_dir, s3_port, args.port) as enclave:
                if args.refused:
                    code = enclave.wait()
                    print(f"\nenclaver run exited {code}: the app's code (3: KMS refused the data key)")
                    return 0 if code == no_fly_list.KMS_REFUSED else 1
                enclave.wait_serving()
                step("5. ask about passengers")
                for name in args.ask or PASSENGERS:
                    print(f"$ curl 'localhost:{args.port}{passenger_path(name)}'", flush=True)
                    print(enclave.ask(name), flush=True)
                    time.sleep(0.2)  # the enclave's log line for it comes first, not amid the next question
                if args.serve:
                    print(f"\nserving on localhost:{args.port} (Ctrl-C stops the enclave)", flush=True)
                    with contextlib.suppress(KeyboardInterrupt):
                        enclave.process.wait()
                step("6. stop the enclave (SIGTERM)")
            print(f"enclaver run exited {enclave.code} (109: stopped by a signal)")
    except GuideError as e:
        print(f"\nrun.py: {e}", file=sys.stderr)
        return 1
    print(f"\ndone in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
