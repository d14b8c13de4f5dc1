"""The manifest as typed, frozen values: what the rest of enclaver works with.

Built only from data that passed validation, so constructors trust types and ranges. `raw` keeps
the file's bytes exactly: the build copies them into the enclave byte for byte.
"""

from __future__ import annotations

import re
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


_AUTHORITY = re.compile(r"([A-Za-z0-9._-]+)(?::([0-9]{1,5}))?")


@dataclass(frozen=True, slots=True)
class KmsEndpoint:
    """Where the KMS proxy sends one region's requests. `host` or `host:port` (upstream's forms, and
    `https://` before either) is HTTPS, through the egress proxy with CONNECT; `http://host[:port]`
    is plain HTTP, for a local KMS in tests only: everything the proxy sends and gets (signed
    requests, answers) crosses the parent in the clear."""

    host: str
    port: int = 443
    tls: bool = True

    @classmethod
    def parse(cls, text: str) -> KmsEndpoint:
        """ValueError for anything but `[http://|https://]host[:port]` with a port of 1..65535."""
        scheme, sep, rest = text.partition("://")
        if not sep:
            scheme, rest = "https", text
        if scheme not in ("http", "https"):
            raise ValueError(f"KMS endpoint {text!r}: the scheme must be http:// or https://, or none")
        match = _AUTHORITY.fullmatch(rest)
        if match is None:
            raise ValueError(f"KMS endpoint {text!r}: give host or host:port (with http:// for a local KMS)")
        tls = scheme == "https"
        port = int(match.group(2)) if match.group(2) else (443 if tls else 80)
        if not 0 < port < 65536:
            raise ValueError(f"KMS endpoint {text!r}: port {port} is not in 1..65535")
        return cls(match.group(1), port, tls)

    @classmethod
    def default(cls, region: str) -> KmsEndpoint:
        """AWS's public endpoint: `kms.<region>.amazonaws.com` (`.amazonaws.com.cn` in China)."""
        return cls(f"kms.{region}.amazonaws.com" + (".cn" if region.startswith("cn-") else ""))

    @property
    def authority(self) -> str:
        """`host`, or `host:port` when the port is not the scheme's default (the Host header's value)."""
        return self.host if self.port == (443 if self.tls else 80) else f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.authority}/"

    def __str__(self) -> str:
        return self.authority if self.tls else f"http://{self.authority}"


@dataclass(frozen=True, slots=True)
class KmsProxy:
    listen_port: int
    endpoints: tuple[tuple[str, str], ...] = ()

    def endpoint(self, region: str) -> KmsEndpoint:
        """`endpoints[region]` if the manifest names one, else AWS's default for the region."""
        given = dict(self.endpoints).get(region)
        return KmsEndpoint.parse(given) if given is not None else KmsEndpoint.default(region)


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
    outputs: tuple[str, ...] = ()  # ours: directories odyn copies out on FILES_OUT_PORT
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
            outputs=tuple(data.get("outputs") or ()),
            path=path,
            raw=raw,
        )
