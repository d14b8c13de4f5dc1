"""Task `show:<name>`: print an enclave's PCRs and where its outputs are, every time.

The build steps print only when they run, so a no-op `doit` used to end in silence: the person
who just wants the PCRs or the policy's path again had to dig in `cache/out/`. `show` reads the
latest build's records (it builds first when needed) and never writes anything.
"""

from __future__ import annotations

import json
from typing import Any

from enclaver_rules.rules.common import BUILD, EIF_FILE, MEASUREMENTS, POLICY, latest_dir, reported


@reported
def show_enclave(cache_dir: str, name: str) -> dict[str, Any]:
    latest = latest_dir(cache_dir, name)
    summary = json.loads((latest / BUILD).read_text())
    for pcr in ("PCR0", "PCR1", "PCR2", "PCR8"):
        if pcr in summary["measurements"]:
            print(f"{name}: {pcr} {summary['measurements'][pcr]}")
    if summary.get("development"):
        print(f"{name}: built with a development blob set: these PCRs are for trying the pipeline, not for AWS")
    print(f"{name}: release image {summary['target']} {summary['release_image']}")
    print(f"{name}: EIF {latest / EIF_FILE}")
    print(f"{name}: measurements {latest / MEASUREMENTS}")
    policy = latest / POLICY
    if policy.is_file():
        print(f"{name}: KMS key policy {policy}")
    else:
        print(f"{name}: no KMS key policy yet: ENC_KMS_ACCOUNT=<12-digit AWS account ID> doit trust:{name}")
    return {"directory": str(latest)}


def show_tasks(enclaves: list[Any], cache_dir: str) -> Any:
    yield {"basename": "show", "name": None, "doc": "print every enclave's PCRs and where its outputs are"}
    for e in enclaves:
        yield {
            "basename": "show", "name": e.name, "doc": f"print the PCRs and output paths of {e.path}",
            "actions": [(show_enclave, [cache_dir, e.name])],
            "task_dep": [f"build:{e.name}"],
            "uptodate": [False],  # it only prints: always
            "verbosity": 2,
        }
