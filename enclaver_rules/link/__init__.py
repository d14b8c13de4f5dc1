"""What odyn and the host side both speak over vsock: one home, imported by `odyn` and `runtime`.

Pure (standard library only, plus `enclaver_rules.ports`), and staged into odyn's static binary:

- `transport`: the `Transport` interface (listen, connect; streams with half-close), AF_VSOCK, and
  its Unix-socket emulation for the simulator and the tests;
- `frames`: the egress tunnel handshake (a length-prefixed JSON request and answer), sans-IO;
- `relay`: half-close-aware copying between two streams (`splice`), and the `SETTLED` hook a
  connection tracker uses to learn that the app's bytes have left;
- `status`: the status stream (vsock 17000), one JSON line per state: `Status.line` and
  `Status.parse`, and the host's exit code for a final status;
- `logs`: the log stream (vsock 17001): raw bytes, ended by a half-close; `follow` reads it.

What only runs inside the enclave (the supervisor, the log ring, the proxies, bring-up) stays in
`odyn`; nothing here imports `odyn`, and nothing under `enclaver_rules` may (tests/test_imports.py).
This module imports nothing.
"""
