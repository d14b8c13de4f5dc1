"""Process-level pieces of the simulator for end-to-end tests: an EIF really built here and its
measurements file, and `enclaver attestation sim-nsm` running as its own process."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import queue
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from enclaver_rules.eif.blobs import write_dev_blobs
from enclaver_rules.oci.layer import Entry
from oci_helpers import make_layout

START_TIMEOUT = 60.0  # a bound so a broken server fails the test instead of hanging it; never asserted


def built_measurements(cli: Callable[..., Any], where: Path, app: bytes = b"attested app") -> Path:
    """Build an EIF of a one-file image with the development blob set (`enclaver eif build`) and
    write its measurements as the rule set does (`{"Measurements": {...}}`); returns that file."""
    where.mkdir(parents=True, exist_ok=True)
    make_layout(str(where / "layout"), "v", [[Entry.file("bin/app", app, 0o755)]], cmd=("/bin/app",))
    write_dev_blobs(where / "blobs", "x86_64")
    built = cli("eif", "build", "--image", f"oci:{where / 'layout'}:v", "--blobs", str(where / "blobs"),
                "-o", str(where / "app.eif"), "--cache-dir", str(where / "cache"), "--json")
    assert built.code == 0, built.stderr
    path = where / "measurements.json"
    path.write_text(json.dumps({"Measurements": built.json()["Measurements"]}))
    return path


@contextlib.contextmanager
def sim_nsm(socket: Path, measurements: Path, state: Path, *extra: str) -> Iterator[dict[str, Any]]:
    """`enclaver attestation sim-nsm` as its own process (as `enclaver run --simulate` starts it);
    yields the facts it prints once its socket listens (socket, module_id, root, …)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "enclaver_rules.cli", "attestation", "sim-nsm", "--socket", str(socket),
         "--measurements", str(measurements), "--state", str(state), "--json", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "NO_COLOR": "1"})
    found: queue.Queue[dict[str, Any]] = queue.Queue()

    def read() -> None:  # the JSON document is printed once the socket listens
        lines = []
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line)
            if line.startswith("}"):
                found.put(json.loads("".join(lines)))
                return

    threading.Thread(target=read, daemon=True).start()
    try:
        try:
            facts = found.get(timeout=START_TIMEOUT)
        except queue.Empty:
            process.kill()
            raise AssertionError(f"sim-nsm did not start: {process.communicate()[1]}") from None
        yield facts
    finally:
        if process.poll() is None:
            process.terminate()
        process.communicate(timeout=30)


@contextlib.contextmanager
def http_page(body: bytes, host: str = "127.0.0.1") -> Iterator[int]:
    """A stand-in HTTP server answering every GET with `body` (what `--sim-host` maps a name to);
    yields its port."""
    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer((host, 0), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
