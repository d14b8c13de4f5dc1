"""Task `trust:<name>`: the KMS key policy for the latest build, beside its EIF.

The policy lets the decrypt-side KMS actions through only for an enclave whose attested
measurements match (`enclaver_rules.policy.kms`). The account, key administrator and principal
come from ENC_KMS_ACCOUNT, ENC_KMS_ADMIN and ENC_KMS_PRINCIPAL, by the rule `enclaver trust` uses
(`kms.trust_from`); changing one re-runs the task. Without ENC_KMS_ACCOUNT the task fails: there
is no default account. ENC_KMS_IMMUTABLE=1 (`enclaver trust --immutable`) writes a policy nobody
can change once applied, with the lock-out warning on stderr.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from doit.tools import config_changed

from enclaver_rules.oci.store import atomic_write
from enclaver_rules.policy import kms
from enclaver_rules.rules.common import BUILD, LATEST, POLICY, latest_dir, out_dir, reported


@reported
def write_policy(cache_dir: str, name: str) -> dict[str, Any]:
    """The KMS key policy for the latest build, beside its EIF. Settings are validated before
    anything is read or written, so a missing ENC_KMS_ACCOUNT fails the task with its fix."""
    trust = kms.trust_from(os.environ)  # ENC_KMS_ACCOUNT, _ADMIN, _PRINCIPAL and _IMMUTABLE
    latest = latest_dir(cache_dir, name)
    summary = json.loads((latest / BUILD).read_text())
    policy = kms.key_policy(summary["measurements"], trust)
    path = latest / POLICY
    atomic_write(path, json.dumps(policy, indent=2).encode() + b"\n")
    print(f"{name}: KMS key policy written to {path}")
    if trust.immutable:
        print(f"{name}: warning: {kms.LOCKOUT_WARNING}", file=sys.stderr)
    return {"policy": str(path)}


def trust_tasks(enclaves: list[Any], cache_dir: str) -> Any:
    yield {"basename": "trust", "name": None, "doc": "write every enclave's KMS key policy"}
    for e in enclaves:
        latest = out_dir(cache_dir, e.name) / LATEST
        yield {
            "basename": "trust", "name": e.name, "doc": f"KMS key policy for {e.path}",
            "actions": [(write_policy, [cache_dir, e.name])],
            "task_dep": [f"build:{e.name}"],
            "file_dep": [str(latest / BUILD)],
            "targets": [str(latest / POLICY)],
            "uptodate": [config_changed({k: os.environ.get(k) for k in kms.VARIABLES})],
            "verbosity": 2,
        }
