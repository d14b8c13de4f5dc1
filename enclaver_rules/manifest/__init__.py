"""The `enclaver.yaml` manifest: schema, loading, validation messages, configuration precedence."""

from enclaver_rules.manifest.config import Config, Effective, Setting, overridable_settings, resolve, settings
from enclaver_rules.manifest.load import DEFAULT_MANIFEST, CheckResult, check_file, load_manifest
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
