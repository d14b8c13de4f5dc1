"""The vsock port map and in-enclave defaults, in one place for odyn, the host side and checks.

Values are upstream enclaver's, so images built by either tool talk to either runtime.
"""

from __future__ import annotations

#: vsock port on which odyn streams the app's status (newline-delimited JSON).
STATUS_PORT = 17000
#: vsock port on which odyn streams the app's stdout/stderr.
LOGS_PORT = 17001
#: vsock port the host side listens on for egress tunnels out of the enclave.
EGRESS_PORT = 17002
#: vsock port on which odyn streams the files of the manifest's `outputs:` (ours; enclaver_rules.link.files).
FILES_OUT_PORT = 17003
#: Ports an ingress may not use: an ingress listens on the vsock port equal to its TCP port.
RESERVED_VSOCK_PORTS = {STATUS_PORT: "status", LOGS_PORT: "logs", EGRESS_PORT: "egress", FILES_OUT_PORT: "files-out"}

#: CID of the parent instance, as seen from the enclave.
HOST_CID = 2
#: CID that listeners bind to: any.
ANY_CID = 0xFFFFFFFF

#: Egress HTTP proxy on 127.0.0.1 inside the enclave (9000 up to upstream v0.4.2).
DEFAULT_EGRESS_PROXY_PORT = 10000
TRANSPARENT_DNS_PORT = 53  # egress.transparent (ours): the DNS responder on 127.0.0.1 inside the enclave
#: Instance metadata service: the KMS proxy gets region and credentials from it.
IMDS_ADDRESS = "169.254.169.254"
