"""The enclave image: the app image plus one deterministic layer, in upstream's layout. Pure.

The layer holds the manifest byte for byte at /etc/enclaver/enclaver.yaml, odyn at /sbin/odyn and
/var/lib/odyn (where the static odyn unpacks itself: the Nitro init mounts /tmp noexec). The
entrypoint becomes `/sbin/odyn --config-dir /etc/enclaver -- <app ENTRYPOINT…> <app CMD…>` and CMD
is cleared, as upstream does (compat notes §3). TMPDIR points odyn at its unpack directory and
ODYN_APP_TMPDIR keeps the app's own value, which odyn restores for the app. ENV, WORKDIR and USER of
the app image are left as they are.
"""

from __future__ import annotations

from enclaver_rules.errors import InvalidInput
from enclaver_rules.oci.layer import Entry
from enclaver_rules.oci.model import ImageConfig
from enclaver_rules.oci.mutate import ConfigEdit

MANIFEST_PATH = "/etc/enclaver/enclaver.yaml"
CONFIG_DIR = "/etc/enclaver"
ODYN_PATH = "/sbin/odyn"
UNPACK_DIR = "/var/lib/odyn"
LABEL = "dev.enclaver"


def layer_entries(manifest: bytes, odyn: bytes) -> list[Entry]:
    return [Entry.file(MANIFEST_PATH, manifest, 0o644), Entry.file(ODYN_PATH, odyn, 0o755),
            Entry.dir(UNPACK_DIR, 0o700)]


def app_argv(config: ImageConfig, image: str) -> list[str]:
    argv = list(config.entrypoint) + list(config.cmd)
    if not argv:
        raise InvalidInput(f"{image} has neither ENTRYPOINT nor CMD: odyn would have nothing to start",
                           field="sources.app", fix="give the image a CMD (or ENTRYPOINT) in its Dockerfile")
    return argv


def config_edit(app: ImageConfig, image: str, labels: dict[str, str] | None = None) -> ConfigEdit:
    tmpdir = next((e.split("=", 1)[1] for e in app.env if e.startswith("TMPDIR=")), "")
    return ConfigEdit(
        entrypoint=(ODYN_PATH, "--config-dir", CONFIG_DIR, "--", *app_argv(app, image)),
        cmd=(),
        env=(("TMPDIR", UNPACK_DIR), ("ODYN_APP_TMPDIR", tmpdir)),
        labels=tuple(sorted((labels or {}).items())),
    )


def label_pcrs(labels: dict[str, str]) -> dict[str, str]:
    """The PCRs a release image's labels claim (`dev.enclaver.pcr0` → `PCR0`), empty values left out."""
    prefix = f"{LABEL}.pcr"
    return {"PCR" + k[len(prefix):]: v for k, v in labels.items() if k.startswith(prefix) and v}


def label_disagreements(claimed: dict[str, str], measured: dict[str, str]) -> list[str]:
    """Each claimed PCR that is not what the EIF measures, as `PCR0 labelled … but measured …`: one format
    for `enclaver run` and `enclaver trust --recompute`, hex compared without regard to case."""
    return [f"{k} labelled {v} but measured {measured.get(k) or 'absent'}" for k, v in sorted(claimed.items())
            if (measured.get(k) or "").lower() != v.lower()]
