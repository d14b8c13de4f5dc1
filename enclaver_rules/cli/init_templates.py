"""What `enclaver init` writes: a minimal `dodo.py`, a sample `enclaver.yaml` and `.gitignore` lines.

Strings here rather than package data: they are small, and ship in the wheel with no manifest entry.
`tests/test_init.py` checks that the manifest is valid, and valid still with every example in it
uncommented (the lines starting `#   `), so the comments cannot teach a field that does not check.
"""

from __future__ import annotations

from string import Template

#: Only the rule set's exported names, so a change to them (where doit keeps its state, for one)
#: reaches every repository that `enclaver init` set up, with no edit there.
DODO = '''\
"""doit entry point for enclaver (written by `enclaver init`). Declares nothing itself: the tasks
come from enclaver's rule set, one set per enclaver.yaml found below this directory.

    doit list --all        # every task: check:<name>, build:<name>, trust:<name>, push:<name>, …
    doit                   # check and explain every enclaver.yaml
    doit build:<name>      # build one enclave (release image, EIF and measurements in cache/out/<name>/)
    doit -n 4 build        # build every enclave, four tasks at a time
    doit verify:<name>     # CI: rebuild from nothing and fail unless the PCRs are the same
    doit -k …              # from a subfolder (or export DOIT_SEEK_FILE=1)
"""

import os

from enclaver_rules.rules import tasks

ROOT = os.path.dirname(os.path.abspath(__file__))
# the task creators and DOIT_CONFIG (doit's state in cache/, or in $ENC_CACHE_DIR)
globals().update(tasks(ROOT))
'''

MANIFEST = Template('''\
# One AWS Nitro Enclave, in upstream enclaver's v1 format (written by `enclaver init`).
# `enclaver manifest check` validates this file; `enclaver manifest explain` says in plain words
# what the enclave runs, what can reach it and what it can reach. Every field is in enclaver's README.
version: v1

# Names this enclave's doit tasks (`doit build:$name`) and its outputs (cache/out/$name/).
# Letters, digits, '.', '_' and '-'.
name: "$name"

# The tag the release image gets, and where `doit push:$name` pushes it.
# EDIT before pushing: your registry and repository.
target: "registry.example.com/$repo:enclave"

sources:
  # EDIT: the application image; its entrypoint and cmd become the app that runs in the enclave.
  # A registry image, a local Docker image (`docker build -t $repo:latest .`, then `$repo:latest`),
  # or an OCI layout beside this file (`oci:DIR:TAG`).
  app: "registry.example.com/$repo:latest"

# Resources the enclave starts with. On x86 instances with two threads per core, Nitro needs
# whole cores: keep cpu_count even.
defaults:
  cpu_count: 2
  memory_mb: 4096

# Ports the enclave accepts connections on. None: nothing outside can connect to it.
# For example, to serve the app's port 8080 (TCP on 127.0.0.1 inside, the same port on the host),
# replace the line below with:
#   ingress:
#     - listen_port: 8080
ingress: []

# Where the enclave may connect to. Nothing is allowed, so it has no outbound network at all.
# The app reaches what `allow` lists through the egress proxy (HTTP_PROXY/HTTPS_PROXY are set for
# it); `deny` makes exceptions. For example, replace the line below with:
#   egress:
#     allow:
#       - api.example.com
#       - "*.s3.amazonaws.com"
#       - kms.*.amazonaws.com
#       - 169.254.169.254
#     deny:
#       - internal.example.com
egress: {allow: []}

# The KMS proxy: the app calls KMS on this port inside the enclave and the proxy attaches the
# enclave's attestation, so a KMS key policy can trust exactly this build (`doit trust:$name`).
# Needs egress to kms.*.amazonaws.com and 169.254.169.254 (instance metadata), as above.
#   kms_proxy:
#     listen_port: 9999

# How enclaver builds the EIF (enclaver's own block: upstream enclaver rejects it).
# The Nitro kernel blob set defaults to /usr/share/nitro_enclaves/blobs, which AWS's
# aws-nitro-enclaves-cli-devel package installs. To try the pipeline elsewhere, run
# `enclaver blobs dev -o blobs-dev` here, which writes a development set (its EIFs cannot boot),
# and set `blobs: blobs-dev` (a directory is relative to this file).
#   build:
#     blobs: /usr/share/nitro_enclaves/blobs
''')

GITIGNORE_COMMENT = "# enclaver: the store, doit's state and the build outputs; the virtualenv"
#: (line written, lines that already mean the same thing)
GITIGNORE_ENTRIES: tuple[tuple[str, frozenset[str]], ...] = (
    ("/cache/", frozenset({"cache", "cache/", "/cache", "/cache/", "cache/*", "/cache/*", "/cache/**"})),
    (".venv/", frozenset({".venv", ".venv/", "/.venv", "/.venv/"})),
)


def manifest(name: str, repository: str) -> str:
    """`repository`: `name` as an image repository may spell it (lower case, one separator at a time)."""
    return MANIFEST.substitute(name=name, repo=repository)
