"""Image edits (append layers; set entrypoint, cmd, env, labels) with machine-independent results.

An edit parses the base config, changes it, and writes it back as canonical JSON (sorted keys, no
whitespace); the new manifest is an OCI manifest in the same canonical form. Time comes in as a
parameter (SOURCE_DATE_EPOCH), never from the clock, so the same inputs give the same manifest
digest everywhere.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from enclaver_rules.oci import mediatypes as mt
from enclaver_rules.oci.digest import Digest
from enclaver_rules.oci.layer import Layer
from enclaver_rules.oci.model import ImageConfig, Manifest, parse

_TO_OCI = {mt.DOCKER_LAYER_GZIP: mt.OCI_LAYER_GZIP, mt.DOCKER_CONFIG: mt.OCI_CONFIG}


def canonical_json(data: Any) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def rfc3339(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True, slots=True)
class ConfigEdit:
    """None leaves a field alone; an empty list clears Entrypoint/Cmd."""

    entrypoint: tuple[str, ...] | None = None
    cmd: tuple[str, ...] | None = None
    env: tuple[tuple[str, str], ...] = ()  # set or replace NAME=value
    labels: tuple[tuple[str, str], ...] = ()  # set or replace


@dataclass(frozen=True, slots=True)
class EditedImage:
    config: bytes
    manifest: bytes

    @property
    def config_digest(self) -> Digest:
        return Digest.of(self.config)

    @property
    def manifest_digest(self) -> Digest:
        return Digest.of(self.manifest)


PLATFORMS = {"x86_64": "amd64", "aarch64": "arm64"}


def empty_image(arch: str) -> tuple[Manifest, ImageConfig]:
    """An image with no layers and an empty config for `arch` (x86_64 or aarch64): the base of
    images made here from nothing (the odyn image, release images on an empty sleeve)."""
    config = canonical_json({"architecture": PLATFORMS[arch], "os": "linux", "config": {},
                             "rootfs": {"type": "layers", "diff_ids": []}})
    manifest = canonical_json({"schemaVersion": 2, "mediaType": mt.OCI_MANIFEST, "layers": [],
                               "config": {"mediaType": mt.OCI_CONFIG, "digest": str(Digest.of(config)),
                                          "size": len(config)}})
    parsed = parse(manifest, mt.OCI_MANIFEST, f"empty {arch} image")
    assert isinstance(parsed, Manifest)
    return parsed, ImageConfig.parse(config, f"empty {arch} image config")


def edit_image(manifest: Manifest, config: ImageConfig, *, layers: Sequence[Layer] = (), edit: ConfigEdit = ConfigEdit(),
               created: int = 0, created_by: str = "enclaver",
               annotations: Sequence[tuple[str, str]] = ()) -> EditedImage:
    """The image with `layers` appended and `edit` applied to its config; `annotations` are added
    to the manifest's (registries and `oras` show those without fetching the config)."""
    data = copy.deepcopy(config.data)
    if not isinstance(data.get("config"), dict):
        data["config"] = {}
    process: dict[str, Any] = data["config"]
    if edit.entrypoint is not None:
        process["Entrypoint"] = list(edit.entrypoint) or None
    if edit.cmd is not None:
        process["Cmd"] = list(edit.cmd) or None
    if edit.env:
        env = [e for e in process.get("Env") or [] if e.split("=", 1)[0] not in dict(edit.env)]
        process["Env"] = env + [f"{k}={v}" for k, v in edit.env]
    if edit.labels:
        process["Labels"] = {**(process.get("Labels") or {}), **dict(edit.labels)}
    rootfs = data.setdefault("rootfs", {"type": "layers", "diff_ids": []})
    rootfs["diff_ids"] = list(rootfs.get("diff_ids") or []) + [str(layer.diff_id) for layer in layers]
    history = list(data.get("history") or [])
    if layers:
        history += [{"created": rfc3339(created), "created_by": created_by} for _ in layers]
    else:
        history.append({"created": rfc3339(created), "created_by": created_by, "empty_layer": True})
    data["history"] = history
    data["created"] = rfc3339(created)
    config_bytes = canonical_json(data)

    layer_descriptors = [
        {**d.to_json(), "mediaType": _TO_OCI.get(d.media_type, d.media_type)} for d in manifest.layers
    ] + [{"mediaType": layer.media_type, "digest": str(layer.digest), "size": layer.size} for layer in layers]
    new_manifest: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": mt.OCI_MANIFEST,
        "config": {"mediaType": mt.OCI_CONFIG, "digest": str(Digest.of(config_bytes)), "size": len(config_bytes)},
        "layers": layer_descriptors,
    }
    if manifest.annotations or annotations:
        new_manifest["annotations"] = {**dict(manifest.annotations), **dict(annotations)}
    return EditedImage(config_bytes, canonical_json(new_manifest))
