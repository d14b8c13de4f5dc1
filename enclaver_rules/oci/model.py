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
        """From an index entry's `platform` or an image config; `ValueError` when a field is not text."""
        os_name, arch, variant = data.get("os", ""), data.get("architecture", ""), data.get("variant")
        for name, value in (("os", os_name), ("architecture", arch), ("variant", variant)):
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{name} must be a string, not {json_type(value)}")
        return cls(os_name or "", arch or "", variant or None).normalised()

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


def json_type(value: Any) -> str:
    """What a JSON value is, in words, for messages (`a string`, `a list`, …)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object" if isinstance(value, dict) else type(value).__name__


def _load(raw: bytes, where: str) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except ValueError as e:  # not UTF-8, not JSON, or an integer too long to convert
        raise OperationFailed(f"{where}: not JSON: {e}", fix="the image is corrupt") from None
    except RecursionError:  # CPython's decoder recurses once per nesting level
        raise OperationFailed(f"{where}: JSON nested too deeply to read", fix="the image is corrupt") from None
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


#: Where the image config says what to run. Docker reads `Cmd` and `Entrypoint` as a list of
#: strings or one string (moby's `strslice.StrSlice`: `"Cmd": "x"` is `["x"]`), `Env` only as a list.
_STRSLICE = ("Entrypoint", "Cmd")
_CONFIG_FIX = "the image config is malformed: rebuild the image (docker build writes these fields correctly)"


@dataclass(frozen=True, slots=True)
class ImageConfig:
    """The image configuration (the JSON the image ID is the digest of).

    Parsing keeps any JSON object; the fields enclaver uses (the process block, platform,
    diff_ids) are checked when they are read, so a malformed one is an `InvalidInput` naming the
    field, never a wrong value: `"Cmd": "x"` means `["x"]` as in Docker, `"Cmd": [1]` is refused.
    """

    raw: bytes
    data: dict[str, Any]
    where: str = field(default="image config", compare=False)

    @classmethod
    def parse(cls, raw: bytes, where: str) -> ImageConfig:
        return cls(raw, _load(raw, where), where)

    def _invalid(self, name: str, message: str) -> InvalidInput:
        return InvalidInput(message, file=self.where, field=name, fix=_CONFIG_FIX)

    @property
    def digest(self) -> Digest:
        return Digest.of(self.raw)

    @property
    def platform(self) -> Platform:
        try:
            return Platform.from_json(self.data)
        except ValueError as e:
            raise self._invalid("platform", str(e)) from None

    @property
    def process(self) -> dict[str, Any]:
        """The `config` block, after `check()`: whichever field is asked for, all are checked, so code
        that edits a copy of the whole config (oci.mutate) never meets a wrong type."""
        self.check()
        config = self.data.get("config")
        return config if isinstance(config, dict) else {}

    def check(self) -> None:
        """`InvalidInput` naming the first field enclaver reads or edits that has the wrong JSON type:
        config.{Entrypoint,Cmd,Env,Labels}, rootfs.diff_ids, history."""
        config = self.data.get("config")
        if config is not None:
            if not isinstance(config, dict):
                raise self._invalid("config", f"must be an object, not {_describe(config)}")
            for key in (*_STRSLICE, "Env"):
                self._strings(config, key)
            labels = config.get("Labels")
            if labels is not None and not (isinstance(labels, dict) and
                                           all(isinstance(v, str) for v in labels.values())):
                raise self._invalid("config.Labels", f"must be an object of strings, not {_describe(labels)}")
        history = self.data.get("history")
        if history is not None and not isinstance(history, list):
            raise self._invalid("history", f"must be a list, not {_describe(history)}")
        _ = self.diff_ids  # checks rootfs

    def _strings(self, config: dict[str, Any], key: str) -> list[str]:
        value = config.get(key)
        if value is None:
            return []
        if isinstance(value, str) and key in _STRSLICE:
            return [value]
        if not isinstance(value, list):
            raise self._invalid(f"config.{key}", f"must be a list of strings, not {_describe(value)}")
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise self._invalid(f"config.{key}[{i}]", f"must be a string, not {_describe(item)}")
        return list(value)

    @property
    def entrypoint(self) -> list[str]:
        return self._strings(self.process, "Entrypoint")

    @property
    def cmd(self) -> list[str]:
        return self._strings(self.process, "Cmd")

    @property
    def env(self) -> list[str]:
        return self._strings(self.process, "Env")

    @property
    def labels(self) -> dict[str, str]:
        return dict(self.process.get("Labels") or {})

    @property
    def diff_ids(self) -> list[Digest]:
        if "rootfs" not in self.data:
            return []
        rootfs = self.data["rootfs"]
        if not isinstance(rootfs, dict):  # null too: oci.mutate appends to it
            raise self._invalid("rootfs", f"must be an object, not {_describe(rootfs)}")
        ids = rootfs.get("diff_ids")
        if ids is None:
            return []
        if not isinstance(ids, list):
            raise self._invalid("rootfs.diff_ids", f"must be a list of digests, not {_describe(ids)}")
        out = []
        for i, item in enumerate(ids):
            try:
                out.append(Digest.parse(item if isinstance(item, str) else ""))
            except ValueError:
                raise self._invalid(f"rootfs.diff_ids[{i}]", f"must be a digest, not {_describe(item)}") from None
        return out


def _describe(value: Any) -> str:
    """`a string ('/bin/sh')`: the type, and a short excerpt of scalars."""
    if isinstance(value, str | int | float) and not isinstance(value, bool):
        text = repr(value)
        return f"{json_type(value)} ({text[:60]}{'…' if len(text) > 60 else ''})"
    return json_type(value)
