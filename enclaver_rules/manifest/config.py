"""Effective configuration: command-line flag > `ENC_*` variable > manifest file > built-in default.

Names are derived from the manifest path: `defaults.memory_mb` is `--defaults-memory-mb` and
`ENC_DEFAULTS_MEMORY_MB`. Only fields marked `x-enclaver-overridable` in the schema can be
overridden; those are exactly the fields odyn never reads inside the enclave. Policy fields
(`ingress`, `egress`, `kms_proxy`, `api`) reach the enclave as the manifest file, byte for byte,
and are measured into PCR2; letting a variable change them would make the file lie about the
policy the enclave enforces, so they are set in the file only and an attempt to override one is
an error, not a silent no-op.

Values are shown (by `config show`, in conflict warnings) through `shown()`: `signature.key` may
hold the key itself rather than its path (pasted into the manifest or into ENC_SIGNATURE_KEY), so
key material is shown as its kind and fingerprint, never as text; every other string passes through
`redact.text` (a `target` written as `user:PASS@host/app` shows `***@host/app`). The values used for
the build are untouched.
"""

from __future__ import annotations

import copy
import difflib
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Literal

from enclaver_rules import redact
from enclaver_rules.errors import Diagnostic, InvalidInput
from enclaver_rules.manifest import schema as sch

if TYPE_CHECKING:
    from enclaver_rules.manifest._yaml import Path
    from enclaver_rules.manifest.model import Manifest
    from enclaver_rules.manifest.validate import OverlayLocator

Origin = Literal["flag", "env", "file", "default"]
#: The manifest a command reads when not given one (`load` has it too): here, so the CLI's flags, which
#: `settings()` lists from the schema, are made without loading YAML, the policy model or jsonschema.
DEFAULT_MANIFEST = "enclaver.yaml"
ENV_PREFIX = "ENC_"
_INT = re.compile(r"^[+-]?[0-9]+$")
log = logging.getLogger("enclaver.config")
#: Settings that may hold key material: shown by kind and fingerprint, never as text.
SECRET_SETTINGS = frozenset({"signature.key"})


@dataclass(frozen=True, slots=True)
class Shown:
    """A value as it may be printed: `value` is safe to show; `fingerprint` is set when it was redacted."""

    value: Any
    fingerprint: str | None = None

    @property
    def redacted(self) -> bool:
        return self.fingerprint is not None


def shown(key: str, value: Any) -> Shown:
    """`value` of setting `key` as `config show` and the logs may print it."""
    if not isinstance(value, str):
        return Shown(redact.value(value))
    if key in SECRET_SETTINGS and redact.is_key_material(value):
        return Shown(redact.describe_key(value), redact.fingerprint(value))
    clean = redact.text(value)
    return Shown(clean, redact.fingerprint(value) if clean != value else None)


@dataclass(frozen=True, slots=True)
class Setting:
    """One configurable value, named once and spelled three ways."""

    spec: sch.FieldSpec

    @property
    def key(self) -> str:
        return self.spec.key

    @property
    def path(self) -> tuple[str, ...]:
        return self.spec.path

    @property
    def flag(self) -> str:
        return "--" + self.key.replace(".", "-").replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.key.replace(".", "_").upper()

    @property
    def dest(self) -> str:
        return self.key.replace(".", "_")

    @property
    def overridable(self) -> bool:
        return self.spec.overridable

    def parse(self, raw: str) -> Any:
        """Text from a flag or variable → a typed value; `ValueError` says what was expected."""
        if self.spec.type == "integer":
            if not _INT.match(raw.strip()):
                raise ValueError("is not a whole number")
            return int(raw)
        return raw


@lru_cache(maxsize=1)
def settings() -> tuple[Setting, ...]:
    """Every documented manifest value in schema order (old names and unsupported blocks left out)."""
    return tuple(Setting(s) for s in sch.fields() if s.path and not s.deprecated
                 and not any(p.unsupported for p in _ancestors(s.path)))


def _ancestors(path: tuple[str, ...]) -> list[sch.FieldSpec]:
    index = {s.path: s for s in sch.fields(include_sections=True)}
    return [index[path[:i]] for i in range(1, len(path) + 1) if path[:i] in index]


def overridable_settings() -> tuple[Setting, ...]:
    return tuple(s for s in settings() if s.overridable)


@dataclass(frozen=True, slots=True)
class Candidate:
    origin: Origin
    source: str  # `--flag`, `ENC_VAR`, `file:line:col` or `built-in`
    value: Any


@dataclass(frozen=True, slots=True)
class Effective:
    """A value with the source it came from and the lower-precedence sources it beat."""

    setting: Setting
    value: Any
    origin: Origin
    source: str
    overridden: tuple[Candidate, ...] = ()

    @property
    def conflict(self) -> bool:
        return any(c.value != self.value for c in self.overridden)

    @property
    def shown(self) -> Shown:
        return shown(self.setting.key, self.value)

    def to_json(self) -> dict[str, Any]:
        """For `config show --json`: values as `shown()` gives them (a redacted one says so)."""
        out = {
            "value": self.shown.value,
            "origin": self.origin,
            "source": self.source,
            "overridable": self.setting.overridable,
            "flag": self.setting.flag if self.setting.overridable else None,
            "env": self.setting.env if self.setting.overridable else None,
            "overridden": [_candidate_json(self.setting.key, c) for c in self.overridden],
        }
        return {**out, **_redaction_json(self.shown)}


def _redaction_json(s: Shown) -> dict[str, Any]:
    return {"redacted": True, "fingerprint": s.fingerprint} if s.redacted else {}


def _candidate_json(key: str, c: Candidate) -> dict[str, Any]:
    s = shown(key, c.value)
    return {"origin": c.origin, "source": c.source, "value": s.value, **_redaction_json(s)}


@dataclass(frozen=True, slots=True)
class Config:
    file: str
    values: tuple[Effective, ...]
    diagnostics: tuple[Diagnostic, ...]
    manifest: Manifest | None

    @property
    def errors(self) -> tuple[Diagnostic, ...]:
        return tuple(d for d in self.diagnostics if d.severity == "error")

    def require_manifest(self) -> Manifest:
        if self.manifest is None:
            raise InvalidInput(diagnostics=self.errors)
        return self.manifest

    def conflicts(self) -> tuple[Diagnostic, ...]:
        out = []
        for eff in self.values:
            if eff.conflict:
                key = eff.setting.key
                losers = " and ".join(f"{_show(key, c.value)} from {c.source}" for c in eff.overridden)
                out.append(Diagnostic(f"{_show(key, eff.value)} from {eff.source} overrides {losers}",
                                      field=eff.setting.key, severity="warning"))
        return tuple(out)


def _show(key: str, value: Any) -> str:
    value = shown(key, value).value
    return json.dumps(value) if not isinstance(value, str) else value


#: `ENC_*` variables that configure the tool rather than an enclave.
TOOL_VARIABLES = {
    "ENC_CACHE_DIR": "where the content-addressed store lives",
    "ENC_KMS_ACCOUNT": "the AWS account that owns the enclave's KMS key (task trust:<name>)",
    "ENC_KMS_ADMIN": "the key's administrator ARN (task trust:<name>; default: the account root)",
    "ENC_KMS_PRINCIPAL": "the ARN the parent instance calls KMS as (task trust:<name>; default: the account root)",
    "ENC_INSECURE_REGISTRY": "comma-separated registries push:<name> and the remote cache may reach over plain HTTP "
                             "(127.0.0.1 always may)",
    "ENC_REMOTE_CACHE": "REGISTRY/REPO sharing EIF builds (task eif:<name>; `enclaver build --remote-cache`)",
    "ENC_REMOTE_CACHE_READ_ONLY": "1: fetch from the remote cache, never store into it",
    "ENC_REMOTE_CACHE_CHECK_PCRS": "1: recompute a fetched EIF's PCR0 and PCR2 instead of taking them from its record",
}


def _from_environment(environ: Mapping[str, str]) -> tuple[dict[str, tuple[str, str]], list[Diagnostic]]:
    """Our `ENC_*` variables by setting key; every other `ENC_*` name is reported, not ignored."""
    by_env = {s.env: s for s in settings()}
    found: dict[str, tuple[str, str]] = {}
    problems = []
    for name in sorted(n for n in environ if n.startswith(ENV_PREFIX)):
        setting = by_env.get(name)
        if name in TOOL_VARIABLES:
            continue
        if setting is None:
            known = [s.env for s in overridable_settings()]
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.7)
            fix = f"did you mean {close[0]}?" if close else f"unset it; the variables are {', '.join(known)}"
            problems.append(Diagnostic("not an enclaver setting", file=name, fix=fix, severity="warning"))
        elif not setting.overridable:
            problems.append(Diagnostic(
                "is set in the manifest only: the manifest is copied into the enclave and measured, "
                "so its policy and identity cannot come from the environment",
                file=name, field=setting.key, fix=f"unset {name} and edit `{setting.key}` in enclaver.yaml"))
        elif environ[name] == "":
            log.debug("%s is empty: treated as unset", name)
        else:
            found[setting.key] = (name, environ[name])
    return found, problems


def resolve(path: str, flags: Mapping[str, str | None] | None = None,
            environ: Mapping[str, str] | None = None) -> Config:
    """Apply the precedence rules to one manifest; report every problem, of every source."""
    from enclaver_rules.manifest.load import (
        check_referenced_files,
        get_path,
        manifest_dir,
        normalise,
        parse_manifest,
        read_manifest,
        validate,
    )
    from enclaver_rules.manifest.model import Manifest
    from enclaver_rules.manifest.validate import FileLocator, OverlayLocator

    given_flags = {k: v for k, v in (flags or {}).items() if v is not None}
    raw = read_manifest(path)
    doc = normalise(parse_manifest(raw, path))
    file_loc = FileLocator(doc, path)
    env_values, problems = _from_environment(environ or {})
    by_key = {s.key: s for s in settings()}

    data = copy.deepcopy(doc.data)
    overlay = OverlayLocator(file_loc)
    values = []
    for setting in settings():
        candidates: list[Candidate] = []
        given: list[tuple[Origin, str, str]] = []
        if setting.key in given_flags:
            given.append(("flag", setting.flag, given_flags[setting.key]))
        if setting.key in env_values:
            given.append(("env", *env_values[setting.key]))
        for origin, source, text in given:
            if not setting.overridable:  # callers only offer flags for overridable settings
                raise ValueError(f"{setting.key} cannot be overridden")
            try:
                candidates.append(Candidate(origin, source, setting.parse(text)))
            except ValueError as e:
                problems.append(Diagnostic(f"{text!r} {e}", file=source, field=setting.key,
                                           fix=str(setting.spec.node.get("x-enclaver-fix") or "give a whole number")))
        present, value = get_path(doc.data, setting.path)
        if present:
            _, line, col = file_loc.locate(setting.path)
            candidates.append(Candidate("file", f"{path}:{line}:{col}", value))
        if candidates:
            winner, rest = candidates[0], tuple(candidates[1:])
            if winner.origin != "file":
                _set_path(data, setting.path, winner.value, overlay, winner.source)
        else:
            winner, rest = Candidate("default", "built-in", setting.spec.default), ()
        values.append(Effective(by_key[setting.key], winner.value, winner.origin, winner.source, rest))

    base = manifest_dir(path)
    origins: dict[Path, Origin] = {v.setting.path: v.origin for v in values}
    found = validate(data, overlay) + check_referenced_files(
        data, overlay, lambda p: base if origins.get(p) == "file" else ".")
    diagnostics = tuple(problems) + tuple(sorted(doc.problems + found, key=lambda d: (d.file, d.line, d.col)))
    manifest = None
    if not any(d.severity == "error" for d in diagnostics):
        manifest = Manifest.from_data(data, path=path, raw=raw)
    return Config(path, tuple(values), diagnostics, manifest)


def _set_path(data: dict[str, Any], path: tuple[str, ...], value: Any, overlay: OverlayLocator, source: str) -> None:
    node = data
    for depth, part in enumerate(path[:-1], start=1):
        if not isinstance(node.get(part), dict):
            node[part] = {}
            overlay.overrides.setdefault(path[:depth], (source, ""))  # a section the flag created
        node = node[part]
    node[path[-1]] = value
    overlay.overrides[path] = (source, value if isinstance(value, str) else json.dumps(value))


_reported: set[tuple[str, str]] = set()


def report_conflicts(config: Config, logger: logging.Logger = log) -> None:
    """Log each precedence conflict once per process, however many tasks resolve the config."""
    for d in config.conflicts():
        if (d.field, d.message) not in _reported:
            _reported.add((d.field, d.message))
            logger.warning("%s: %s", d.field, d.message)
