"""odyn: the supervisor that runs as PID 1 inside the enclave.

It starts the app, carries its logs and status out over vsock, and is the only way in or out of
the enclave (ingress, and egress checked against the manifest's policy). It may import the pure
parts of `enclaver_rules` (`policy`, `ports`, manifest loading) but never its adapters or CLI, so
its static binary stays small.

Here so far: `transport` (AF_VSOCK and its Unix-socket emulation), `egress_frame` (the egress
tunnel handshake), `status` (the status stream's lines) and `logring` (the bounded log buffer).
The supervisor, proxies and the static binary come next.
"""
