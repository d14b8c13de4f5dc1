"""The `enclaver.yaml` manifest: schema, loading, validation messages, configuration precedence.

The names below load with the submodule that defines them, on first use (PEP 562): `enclaver --version`
and the CLI's flags, made from the schema (`config.overridable_settings`), need neither YAML, the policy
model nor jsonschema. The imports stay plain `from … import` statements, so the static binaries'
builds (and tests/test_imports.py) still see every module this package may load."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from enclaver_rules.manifest.config import (
        DEFAULT_MANIFEST,
        Config,
        Effective,
        Setting,
        overridable_settings,
        resolve,
        settings,
    )
    from enclaver_rules.manifest.load import CheckResult, check_file, load_manifest
    from enclaver_rules.manifest.model import (
        Api,
        Defaults,
        Egress,
        Ingress,
        KmsEndpoint,
        KmsProxy,
        Manifest,
        Signature,
        Sources,
        Tls,
    )

__all__ = [
    "DEFAULT_MANIFEST",
    "Api",
    "CheckResult",
    "Config",
    "Defaults",
    "Effective",
    "Egress",
    "Ingress",
    "KmsEndpoint",
    "KmsProxy",
    "Manifest",
    "Setting",
    "Signature",
    "Sources",
    "Tls",
    "check_file",
    "load_manifest",
    "overridable_settings",
    "resolve",
    "settings",
]

_CONFIG = frozenset({"DEFAULT_MANIFEST", "Config", "Effective", "Setting", "overridable_settings", "resolve", "settings"})
_LOAD = frozenset({"CheckResult", "check_file", "load_manifest"})
_MODEL = frozenset({"Api", "Defaults", "Egress", "Ingress", "KmsEndpoint", "KmsProxy", "Manifest", "Signature", "Sources",
                    "Tls"})


def __getattr__(name: str) -> Any:
    if name in _CONFIG:
        from enclaver_rules.manifest import config

        value = getattr(config, name)
    elif name in _LOAD:
        from enclaver_rules.manifest import load

        value = getattr(load, name)
    elif name in _MODEL:
        from enclaver_rules.manifest import model

        value = getattr(model, name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # once: later look-ups find it without coming here
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
