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

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE / "app"))
sys.path.insert(0, str(HERE.parent))
import no_fly_list  # noqa: E402  (the app's own envelope code seals the list)
from _guide import (  # noqa: E402  (what the guides share)
    ADMIN,
    ENCLAVER,
    REGION,
    TIMEOUT,
    EnclaveProcess,
    GuideError,
    GuideSteps,
    Service,
    access_key,
    add_work,
    free_port,
    guided,
    kms_client,
    kms_serve_argv,
    other_measurements,
    parser,
    show,
    step,
    wait_kms,
)

MANIFEST = "examples/no-fly-list/enclaver.sim.yaml"
LIST = HERE / "no-fly-list.txt"
S3_NAME = "s3.sim.internal"  # the app image's NO_FLY_LIST_S3_ENDPOINT host (examples/images.py)
BUCKET, OBJECT = "no-fly-list", "no-fly-list.json"  # its NO_FLY_LIST_BUCKET and NO_FLY_LIST_OBJECT
PASSENGERS = ("foo", "Big Bird", "cookie   MONSTER", "Kermit the Frog")
# what tests/test_guide_*.py use (other_measurements and ENCLAVER from _guide, as this module's, as before)
__all__ = ["ENCLAVER", "MANIFEST", "S3_NAME", "Enclave", "Guide", "main", "other_measurements", "read_names",
           "s3_server"]


@dataclass
class Guide(GuideSteps):
    """The guide's steps in one checkout (`repo`: dodo.py and examples/), state under `work`."""

    repo: Path = REPO
    work: Path = REPO / "cache" / "no-fly-list-guide"

    doit_tasks: ClassVar[tuple[str, ...]] = ("examples:no-fly-list", "examples:blobs")
    manifest: ClassVar[str] = MANIFEST
    # the administrator may *encrypt* (seal the list): enclaver's policy lets nobody outside the enclave
    # decrypt, and nobody encrypt
    operator_statement: ClassVar[dict[str, Any]] = {
        "Sid": "OperatorMaySealData", "Effect": "Allow", "Principal": {"AWS": ADMIN}, "Action": ["kms:Encrypt"],
        "Resource": "*"}

    # 3. the key, the envelope, the bucket ----------------------------------------------------------

    def kms_state(self) -> Path:
        return self.work / "kms"

    @contextlib.contextmanager
    def local_kms(self) -> Iterator[Any]:
        """`enclaver kms serve` on the state `enclaver run --sim-kms` will use, with an administrator
        identity for this session; yields a boto3 KMS client signing as it. Stopped at the end."""
        admin = access_key("AKIAGUIDE", 6)
        argv = kms_serve_argv(self.kms_state(), [(admin, ADMIN)])
        if self.echo:
            show(argv, [admin[1]])
        with Service(argv, self.work / "kms-setup.log", self.env) as kms:
            line, endpoint = wait_kms(kms)
            if self.echo:
                print(f"  {line}")
            yield kms_client(endpoint, admin)

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
            show(argv)
        enclave = Enclave(subprocess.Popen(argv, cwd=self.repo, env=self.env, stdout=subprocess.PIPE,
                                           stderr=subprocess.PIPE), host_port, self.echo)
        try:
            yield enclave
        finally:
            enclave.stop()


class Enclave(EnclaveProcess):
    """The running `enclaver run` of the app, which answers on host port `port`."""

    def __init__(self, process: subprocess.Popen[bytes], port: int, echo: bool) -> None:
        self.port = port
        super().__init__(process, echo, "  enclave | ", "  run     | ")

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
    with Service(argv, work / "moto.log", moto_env) as moto:
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


def passenger_path(name: str) -> str:
    return "/enclave/passenger?" + urllib.parse.urlencode({"name": name}, quote_via=urllib.parse.quote)


def read_names(path: Path = LIST) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    parser_ = parser(__doc__)
    parser_.add_argument("--port", type=int, default=8001, help="the host port for the app (default 8001)")
    add_work(parser_, "no-fly-list-guide")
    parser_.add_argument("--ask", action="append", metavar="NAME", help=f"a passenger to ask about (repeat; "
                         f"default: {', '.join(PASSENGERS)})")
    parser_.add_argument("--serve", action="store_true", help="keep the enclave serving until Ctrl-C")
    parser_.add_argument("--refused", action="store_true",
                         help="use a key policy for other PCRs: the enclave is refused the data key")
    args = parser_.parse_args(argv)
    guide = Guide(work=args.work.resolve())

    def steps() -> int | None:
        build_dir, policy = guide.build_and_trust(args.refused)
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
        return None

    return guided(steps)


if __name__ == "__main__":
    sys.exit(main())
