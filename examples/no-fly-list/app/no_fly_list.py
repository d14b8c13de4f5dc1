"""The no-fly-list service: answers "is this name on the list?" without anyone on the host seeing the list.

The list lives in S3 as an envelope: a data key encrypted under a KMS key (whose key policy, written
by `enclaver trust`, releases it only to this enclave's measurements), and the names encrypted under
that data key with AES-256-GCM. At start the service fetches the envelope, asks KMS for the data key
through odyn's attesting KMS proxy (AWS_KMS_ENDPOINT), decrypts the names and keeps them in memory
only. It then serves

    GET /check?name=NAME   → {"name": NAME, "on_list": true|false}
    GET /healthz           → {"names": <count>}

on port 8001 (the manifest's ingress). The operator seals a list with the same file:

    python3 no_fly_list.py seal --key-id alias/no-fly-list < names.txt > no-fly-list.json

Environment: NO_FLY_LIST_BUCKET and NO_FLY_LIST_OBJECT name the envelope; AWS_KMS_ENDPOINT is set
by odyn; the region and credentials come from the instance as usual for boto3.
"""

from __future__ import annotations

import base64
import json
import os
import sys
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

PORT = 8001
AAD = b"no-fly-list v1"  # binds the ciphertext to this format: an envelope of anything else will not open


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


def open_envelope(envelope: dict[str, str], decrypt_key: Callable[[bytes], bytes]) -> frozenset[str]:
    """The names in an envelope; `decrypt_key` turns the encrypted data key into the key (KMS)."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    if envelope.get("format") != "no-fly-list v1":
        raise ValueError(f"not a no-fly-list v1 envelope (format {envelope.get('format')!r})")
    key = decrypt_key(base64.b64decode(envelope["key"]))
    plain = AESGCM(key).decrypt(base64.b64decode(envelope["nonce"]), base64.b64decode(envelope["list"]), AAD)
    return frozenset(line for line in plain.decode().split("\n") if line)


def handler(names: frozenset[str]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            url = urlsplit(self.path)
            if url.path == "/check":
                asked = parse_qs(url.query).get("name", [""])[0]
                if not asked.strip():
                    return self._send(400, {"error": "give ?name=NAME"})
                return self._send(200, {"name": asked, "on_list": normalize(asked) in names})
            if url.path == "/healthz":
                return self._send(200, {"names": len(names)})
            return self._send(404, {"error": "GET /check?name=NAME or /healthz"})

        def _send(self, status: int, body: dict[str, object]) -> None:
            data = json.dumps(body).encode() + b"\n"
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
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


def load_from_aws() -> frozenset[str]:
    import boto3

    s3 = boto3.client("s3")
    kms = boto3.client("kms", endpoint_url=os.environ["AWS_KMS_ENDPOINT"])
    envelope = json.loads(s3.get_object(Bucket=os.environ["NO_FLY_LIST_BUCKET"],
                                        Key=os.environ.get("NO_FLY_LIST_OBJECT", "no-fly-list.json"))["Body"].read())
    return open_envelope(envelope, lambda blob: kms.decrypt(CiphertextBlob=blob)["Plaintext"])


def main(argv: list[str]) -> int:
    if argv[:1] == ["seal"]:
        import boto3

        if argv[1:2] != ["--key-id"] or len(argv) != 3:
            print("usage: no_fly_list.py seal --key-id KEY < names.txt > envelope.json", file=sys.stderr)
            return 2
        made = boto3.client("kms").generate_data_key(KeyId=argv[2], KeySpec="AES_256")
        json.dump(seal(sys.stdin, made["Plaintext"], made["CiphertextBlob"], os.urandom(12)), sys.stdout)
        return 0
    names = load_from_aws()
    print(f"no-fly-list: {len(names)} names loaded; serving on :{PORT}", file=sys.stderr)
    ThreadingHTTPServer(("0.0.0.0", PORT), handler(names)).serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
