"""Manifests, indexes, configs and platforms: parsed from bytes, never re-serialised.

A `Manifest` or `Index` keeps the exact bytes it was parsed from; its digest is the digest of
those bytes, so what we verified is what we store and push.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from enclaver_rules.errors import InvalidInput, OperationFailed
from enclaver_rules.oci import mediatypes as mt
from enclaver_rules.oci.digest import Digest

_ARCH_ALIASES = {"x86_64": "amd64", "x86-64": "amd64", "aarch64": "arm64", "armhf": "arm", "armel": "arm"}


@dataclass(frozen=True, slots=True)
class Platform:
    os: str
    architecture: str
    variant: str | None = None

    @classmethod
    def parse(cls, text: str) -> Platform:
        """`linux/arm64`, `linux/arm/v7`, or an architecture alone (`aarch64`, `x86_64`: os linux)."""
        parts = text.strip().split("/")
        if len(parts) == 1:
            parts = ["linux", *parts]
        if len(parts) not in (2, 3) or not all(parts):
            raise InvalidInput(f"{text!r} is not a platform", fix="write os/architecture[/variant], e.g. linux/arm64")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else None).normalised()

    def normalised(self) -> Platform:
        arch = _ARCH_ALIASES.get(self.architecture, self.architecture)
        variant = self.variant
        if arch == "arm64" and variant in (None, "v8"):
            variant = None  # arm64 implies v8; indexes write it either way
        return Platform(self.os, arch, variant)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Platform:
        return cls(str(data.get("os", "")), str(data.get("architecture", "")), data.get("variant")).normalised()

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


@dataclass(frozen=True, slots=True)
class Descriptor:
    media_type: str
    digest: Digest
    size: int
    annotations: tuple[tuple[str, str], ...] = ()
    platform: Platform | None = None
    extra: tuple[tuple[str, Any], ...] = field(default=(), compare=False)  # fields we carry but do not use

    @classmethod
    def from_json(cls, data: Any, where: str) -> Descriptor:
        try:
            size = data["size"]
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise ValueError("size must be a non-negative integer")
            platform = Platform.from_json(data["platform"]) if isinstance(data.get("platform"), dict) else None
            return cls(str(data["mediaType"]), Digest.parse(str(data["digest"])), size,
                       tuple(sorted((data.get("annotations") or {}).items())), platform)
        except (KeyError, TypeError, ValueError) as e:
            raise OperationFailed(f"{where}: malformed descriptor: {e}", fix="the image is corrupt") from None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": str(self.digest), "size": self.size}
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        if self.platform:
            out["platform"] = {"architecture": self.platform.architecture, "os": self.platform.os}
            if self.platform.variant:
                out["platform"]["variant"] = self.platform.variant
        return out

    def annotation(self, key: str) -> str | None:
        return dict(self.annotations).get(key)


def _load(raw: bytes, where: str) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise OperationFailed(f"{where}: not JSON: {e}", fix="the image is corrupt") from None
    if not isinstance(data, dict):
        raise OperationFailed(f"{where}: not a JSON object", fix="the image is corrupt")
    return data


@dataclass(frozen=True, slots=True)
class Manifest:
    raw: bytes
    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]
    annotations: tuple[tuple[str, str], ...] = ()

    @property
    def digest(self) -> Digest:
        return Digest.of(self.raw)

    def descriptor(self, annotations: dict[str, str] | None = None) -> Descriptor:
        return Descriptor(self.media_type, self.digest, len(self.raw), tuple(sorted((annotations or {}).items())))


@dataclass(frozen=True, slots=True)
class Index:
    raw: bytes
    media_type: str
    manifests: tuple[Descriptor, ...]

    @property
    def digest(self) -> Digest:
        return Digest.of(self.raw)

    def select(self, platform: Platform, where: str) -> Descriptor:
        """The manifest for `platform`, chosen by the platform asked for, never by the host's."""
        candidates = [d for d in self.manifests if d.platform is not None and d.media_type in mt.MANIFESTS]
        for d in candidates:
            assert d.platform is not None
            if (d.platform.os, d.platform.architecture) == (platform.os, platform.architecture) and (
                    platform.variant is None or d.platform.variant == platform.variant):
                return d
        offered = ", ".join(sorted({str(d.platform) for d in candidates})) or "none"
        raise OperationFailed(f"{where}: no image for platform {platform}", fix=f"the index offers: {offered}")


def parse(raw: bytes, media_type: str | None, where: str) -> Manifest | Index:
    """Parse manifest or index bytes; `media_type` is the transport's Content-Type, if any."""
    data = _load(raw, where)
    kind = data.get("mediaType") or media_type or ""
    if kind in mt.DOCKER_SCHEMA1 or data.get("schemaVersion") == 1:
        raise OperationFailed(f"{where}: Docker schema 1 manifests are not supported",
                              fix="push the image again with a current Docker or buildx (schema 2)")
    if data.get("schemaVersion") != 2:
        raise OperationFailed(f"{where}: schemaVersion must be 2", fix="the image is corrupt")
    if kind not in mt.MANIFESTS | mt.INDEXES:
        kind = mt.OCI_INDEX if "manifests" in data else mt.OCI_MANIFEST if "config" in data else kind
    if kind in mt.INDEXES:
        children = data.get("manifests")
        if not isinstance(children, list):
            raise OperationFailed(f"{where}: index without a manifests list", fix="the image is corrupt")
        return Index(raw, kind, tuple(Descriptor.from_json(d, where) for d in children))
    if kind in mt.MANIFESTS:
        layers = data.get("layers")
        if not isinstance(layers, list):
            raise OperationFailed(f"{where}: manifest without a layers list", fix="the image is corrupt")
        return Manifest(raw, kind, Descriptor.from_json(data.get("config"), where),
                        tuple(Descriptor.from_json(d, where) for d in layers),
                        tuple(sorted((data.get("annotations") or {}).items())))
    raise OperationFailed(f"{where}: {kind or 'unknown'} is not an image manifest or index",
                          fix="this is not a container image (an artifact?)")


@dataclass(frozen=True, slots=True)
class ImageConfig:
    """The image configuration (the JSON the image ID is the digest of)."""

    raw: bytes
    data: dict[str, Any]

    @classmethod
    def parse(cls, raw: bytes, where: str) -> ImageConfig:
        return cls(raw, _load(raw, where))

    @property
    def digest(self) -> Digest:
        return Digest.of(self.raw)

    @property
    def platform(self) -> Platform:
        return Platform.from_json(self.data)

    @property
    def process(self) -> dict[str, Any]:
        config = self.data.get("config")
        return config if isinstance(config, dict) else {}

    @property
    def entrypoint(self) -> list[str]:
        return list(self.process.get("Entrypoint") or [])

    @property
    def cmd(self) -> list[str]:
        return list(self.process.get("Cmd") or [])

    @property
    def env(self) -> list[str]:
        return list(self.process.get("Env") or [])

    @property
    def labels(self) -> dict[str, str]:
        return dict(self.process.get("Labels") or {})

    @property
    def diff_ids(self) -> list[Digest]:
        rootfs = self.data.get("rootfs") or {}
        return [Digest.parse(d) for d in rootfs.get("diff_ids") or []]
