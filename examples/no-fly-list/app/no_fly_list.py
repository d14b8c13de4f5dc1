"""The no-fly-list service: answers "may this passenger fly?" without anyone on the host seeing the list.

The list lives in S3 as an envelope: a data key encrypted under a KMS key (whose key policy, written
by `enclaver trust --kms-policy`, releases it only to this enclave's measurements), and the names
encrypted under that data key with AES-256-GCM. At start the service fetches the envelope from S3
(through odyn's egress proxy: HTTP_PROXY), asks KMS for the data key through odyn's attesting KMS
proxy (AWS_KMS_ENDPOINT), decrypts the names and keeps them in memory only. It then serves, on port
8001 (the manifest's ingress):

    GET /enclave/passenger?name=NAME → "NAME is cleared to fly. Enjoy your flight!"
                                        or "NAME is on the no-fly list and CAN NOT BOARD!" (the guide's)
    GET /check?name=NAME             → {"name": NAME, "on_list": true|false}
    GET /healthz                     → {"names": <count>}

Configuration, from the environment (the app image sets it, so it is measured like the code):
NO_FLY_LIST_BUCKET and NO_FLY_LIST_OBJECT name the envelope; NO_FLY_LIST_S3_ENDPOINT is the S3
endpoint (unset: AWS's, for the region); AWS_DEFAULT_REGION the region. AWS_KMS_ENDPOINT is set by
odyn; credentials come from the instance (IMDS, through egress) as usual for boto3.

If it cannot start it says why on stderr and exits 3 when KMS refused the data key (e.g. the key
policy does not admit this enclave's measurements), 4 when the envelope could not be fetched or opened.

The operator seals a list with the same file (the data key is made here and encrypted by KMS; the
key policy lets the operator encrypt, and only the enclave decrypt):

    python3 no_fly_list.py seal --key-id KEY_ID < names.txt > no-fly-list.json
"""

from __future__ import annotations

import base64
import json
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

PORT = 8001
AAD = b"no-fly-list v1"  # binds the ciphertext to this format: an envelope of anything else will not open
KMS_REFUSED, NO_ENVELOPE = 3, 4  # exit codes


def normalize(name: str) -> str:
    """One spelling per name: case-folded, inner whitespace collapsed."""
    return " ".join(name.casefold().split())


def seal(names: Iterable[str], data_key: bytes, encrypted_key: bytes, nonce: bytes) -> dict[str, str]:
    """The envelope for `names`: `data_key` (32 bytes) encrypts them, `encrypted_key` is what KMS
    returned for it. `nonce` must be 12 fresh random bytes."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    body = "\n".join(sorted({normalize(n) for n in names if n.strip()})).encode()
    return {"format": "no-fly-list v1", "key": base64.b64encode(encrypted_key).decode(),
            "nonce": base64.b64encode(nonce).decode(),
            "list": base64.b64encode(AESGCM(data_key).encrypt(nonce, body, AAD)).decode()}


def seal_with_kms(names: Iterable[str], kms: Any, key_id: str) -> dict[str, str]:
    """Envelope encryption: a fresh data key encrypts the names, KMS `Encrypt` wraps the data key,
    and the plaintext key is dropped. (GenerateDataKey would hand the operator the key too, but
    the enclave's key policy denies it to everyone outside the enclave.)"""
    data_key = os.urandom(32)
    wrapped = kms.encrypt(KeyId=key_id, Plaintext=data_key)["CiphertextBlob"]
    return seal(names, data_key, wrapped, os.urandom(12))


def open_envelope(envelope: dict[str, str], decrypt_key: Callable[[bytes], bytes]) -> frozenset[str]:
    """The names in an envelope; `decrypt_key` turns the encrypted data key into the key (KMS)."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    if envelope.get("format") != "no-fly-list v1":
        raise ValueError(f"not a no-fly-list v1 envelope (format {envelope.get('format')!r})")
    key = decrypt_key(base64.b64decode(envelope["key"]))
    plain = AESGCM(key).decrypt(base64.b64decode(envelope["nonce"]), base64.b64decode(envelope["list"]), AAD)
    return frozenset(line for line in plain.decode().split("\n") if line)


def answer(asked: str, names: frozenset[str]) -> str:
    """The guide's answer for one passenger."""
    if normalize(asked) in names:
        return f"{asked} is on the no-fly list and CAN NOT BOARD!"
    return f"{asked} is cleared to fly. Enjoy your flight!"


def handler(names: frozenset[str]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            url = urlsplit(self.path)
            asked = parse_qs(url.query).get("name", [""])[0]
            if url.path in ("/check", "/enclave/passenger") and not asked.strip():
                return self._send(400, {"error": "give ?name=NAME"})
            if url.path == "/enclave/passenger":
                return self._send(200, answer(asked, names))
            if url.path == "/check":
                return self._send(200, {"name": asked, "on_list": normalize(asked) in names})
            if url.path == "/healthz":
                return self._send(200, {"names": len(names)})
            return self._send(404, {"error": "GET /enclave/passenger?name=NAME, /check?name=NAME or /healthz"})

        def _send(self, status: int, body: dict[str, object] | str) -> None:
            text = isinstance(body, str)
            data = (body if text else json.dumps(body)).encode() + b"\n"  # type: ignore[union-attr]
            self.send_response(status)
            self.send_header("Content-Type", "text/plain; charset=utf-8" if text else "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        # The names asked about are sensitive: log the method, the path without its query and the
        # status; http.server's error lines quote the request line, so they are replaced whole.
        def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
            sys.stderr.write(f"{self.command} {urlsplit(self.path).path} {getattr(code, 'value', code)}\n")

        def log_message(self, format: str, *args: object) -> None:
            sys.stderr.write("request error (details withheld: they may hold a name)\n")

    return Handler


class StartError(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def load_from_aws(environ: Mapping[str, str] = os.environ) -> frozenset[str]:
    """Fetch the envelope from S3 and open it with the data key KMS releases to this enclave."""
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, obj = environ.get("NO_FLY_LIST_BUCKET", "no-fly-list"), environ.get("NO_FLY_LIST_OBJECT", "no-fly-list.json")
    endpoint = environ.get("NO_FLY_LIST_S3_ENDPOINT") or None
    where = f"s3://{bucket}/{obj}" + (f" at {endpoint}" if endpoint else "")
    once = Config(retries={"total_max_attempts": 2}, s3={"addressing_style": "path"})
    try:
        s3 = boto3.client("s3", endpoint_url=endpoint, config=once)
        envelope = json.loads(s3.get_object(Bucket=bucket, Key=obj)["Body"].read())
    except (BotoCoreError, ClientError, ValueError) as e:
        raise StartError(f"cannot fetch the envelope {where}: {e}", NO_ENVELOPE) from e
    kms = boto3.client("kms", endpoint_url=environ["AWS_KMS_ENDPOINT"], config=once)

    def decrypt(blob: bytes) -> bytes:
        try:
            return bytes(kms.decrypt(CiphertextBlob=blob)["Plaintext"])
        except ClientError as e:
            error = e.response.get("Error", {})
            code, message = error.get("Code", "?"), error.get("Message", "")
            why = (" The key policy releases the data key only to an enclave whose attestation matches its "
                   "kms:RecipientAttestation conditions (PCR0): this enclave's measurements are not the ones it "
                   "names. A rebuilt enclave has a new PCR0: `enclaver trust --kms-policy` (with --update) and "
                   "put the new policy on the key.") if code == "AccessDeniedException" else ""
            raise StartError(f"KMS refused the data key of {where}: {code}: {message}.{why}", KMS_REFUSED) from e
        except BotoCoreError as e:
            raise StartError(f"cannot reach KMS through odyn's proxy ({environ['AWS_KMS_ENDPOINT']}): {e}",
                             KMS_REFUSED) from e

    try:
        return open_envelope(envelope, decrypt)
    except StartError:
        raise
    except Exception as e:  # a wrong key or a damaged envelope: say which, and stop
        raise StartError(f"cannot open the envelope {where}: {type(e).__name__}: {e}", NO_ENVELOPE) from e


def main(argv: list[str]) -> int:
    if argv[:1] == ["seal"]:
        import boto3

        if argv[1:2] != ["--key-id"] or len(argv) != 3:
            print("usage: no_fly_list.py seal --key-id KEY < names.txt > envelope.json", file=sys.stderr)
            return 2
        json.dump(seal_with_kms(sys.stdin, boto3.client("kms"), argv[2]), sys.stdout)
        return 0
    try:
        names = load_from_aws()
    except StartError as e:
        print(f"no-fly-list: {e}", file=sys.stderr)
        return e.code
    print(f"no-fly-list: {len(names)} names loaded; serving on :{PORT}", file=sys.stderr)
    ThreadingHTTPServer(("0.0.0.0", PORT), handler(names)).serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
