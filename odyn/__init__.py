"""odyn: the supervisor that runs as PID 1 inside the enclave.

It starts the app, carries its logs and status out over vsock, and is the only way in or out of
the enclave (ingress, and egress checked against the manifest's policy). It may import the pure
parts of `enclaver_rules` (`policy`, `ports`, manifest loading, and `link`: what it and the host
side both speak) but never its adapters or CLI, so its static binary stays small. Only what runs
inside the enclave lives here.

Modules: `supervisor` (services first, then bring-up, the manifest, egress proxy and ingress, then
the app; flush; final status), `bringup` (mounts, loopback, hostname, NSM entropy, the app's
environment), `nsm`, `sandbox` (no bypass: seccomp), `egress` + `http_head` (the policy-checking
proxy), `ingress`, `connections` (flush on shutdown; connection limits), `logring`, `dns` +
`transparent` (for transparent egress), `api`, `kms_proxy` + `kms_rewrite`, `local_http`. The
transport, the tunnel handshake, the relay and the status and log codecs are in
`enclaver_rules.link`.
"""
