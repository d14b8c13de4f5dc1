"""The manifest as typed, frozen values: what the rest of enclaver works with.

Built only from data that passed validation, so constructors trust types and ranges. `raw` keeps
the file's bytes exactly: the build copies them into the enclave byte for byte.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from enclaver_rules.policy import EgressPolicy
from enclaver_rules.ports import DEFAULT_EGRESS_PROXY_PORT


@dataclass(frozen=True, slots=True)
class Sources:
    app: str
    odyn: str | None = None
    sleeve: str | None = None


@dataclass(frozen=True, slots=True)
class Signature:
    certificate: str
    key: str


@dataclass(frozen=True, slots=True)
class Tls:
    key_file: str
    cert_file: str


@dataclass(frozen=True, slots=True)
class Ingress:
    listen_port: int
    tls: Tls | None = None


@dataclass(frozen=True, slots=True)
class Egress:
    proxy_port: int = DEFAULT_EGRESS_PROXY_PORT
    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()
    transparent: bool = False  # ours: DNS + TCP redirect for apps that ignore HTTP_PROXY

    @property
    def enabled(self) -> bool:
        return bool(self.allow)

    def policy(self) -> EgressPolicy:
        return EgressPolicy.from_lists(self.allow, self.deny)


#: Upstream's run-time defaults; the schema's `default`s say the same (a test keeps them equal).
DEFAULT_CPU_COUNT = 2
DEFAULT_MEMORY_MB = 4096


@dataclass(frozen=True, slots=True)
class Defaults:
    cpu_count: int = DEFAULT_CPU_COUNT
    memory_mb: int = DEFAULT_MEMORY_MB


@dataclass(frozen=True, slots=True)
class KmsProxy:
    listen_port: int
    endpoints: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Api:
    listen_port: int


@dataclass(frozen=True, slots=True)
class Manifest:
    name: str
    target: str
    sources: Sources
    version: str = "v1"
    signature: Signature | None = None
    ingress: tuple[Ingress, ...] = ()
    egress: Egress = Egress()
    defaults: Defaults = Defaults()
    kms_proxy: KmsProxy | None = None
    api: Api | None = None
    path: str = ""
    raw: bytes = b""

    @classmethod
    def from_data(cls, data: dict[str, Any], *, path: str = "", raw: bytes = b"") -> Manifest:
        """Build from validated data whose old source names were already normalised."""
        src = data["sources"]
        sig = data.get("signature")
        eg = data.get("egress") or {}
        dflt = data.get("defaults") or {}
        kms = data.get("kms_proxy")
        api = data.get("api")
        return cls(
            version=data["version"],
            name=data["name"],
            target=data["target"],
            sources=Sources(src["app"], src.get("odyn"), src.get("sleeve")),
            signature=Signature(sig["certificate"], sig["key"]) if sig else None,
            ingress=tuple(
                Ingress(i["listen_port"], Tls(i["tls"]["key_file"], i["tls"]["cert_file"]) if i.get("tls") else None)
                for i in data.get("ingress") or ()
            ),
            egress=Egress(
                eg.get("proxy_port", DEFAULT_EGRESS_PROXY_PORT), tuple(eg.get("allow") or ()), tuple(eg.get("deny") or ()),
                bool(eg.get("transparent", False)),
            ),
            defaults=Defaults(dflt.get("cpu_count", DEFAULT_CPU_COUNT), dflt.get("memory_mb", DEFAULT_MEMORY_MB)),
            kms_proxy=KmsProxy(kms["listen_port"], tuple(sorted((kms.get("endpoints") or {}).items()))) if kms else None,
            api=Api(api["listen_port"]) if api else None,
            path=path,
            raw=raw,
        )
