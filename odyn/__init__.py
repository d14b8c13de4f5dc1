"""odyn: the supervisor that runs as PID 1 inside the enclave.

It starts the app, carries its logs and status out over vsock, and is the only way in or out of
the enclave (ingress, and egress checked against the manifest's policy). It may import the pure
parts of `enclaver_rules` (`policy`, `ports`, manifest loading) but never its adapters or CLI, so
its static binary stays small.

Modules: `transport` (AF_VSOCK and its Unix-socket emulation), `supervisor` (services first, then
bring-up, the manifest, egress proxy and ingress, then the app; flush; final status), `bringup`
(mounts, loopback, hostname, NSM entropy, the app's environment), `nsm`, `sandbox` (no bypass:
seccomp), `egress` + `http_head` + `egress_frame` (the policy-checking proxy and its tunnel
handshake), `ingress`, `relay` + `connections` (half-close aware copying; flush on shutdown),
`status`, `logring`, `dns` (for transparent egress).
"""
