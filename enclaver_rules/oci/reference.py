"""Image references with Docker's defaults, and skopeo's transport prefixes.

    busybox                         → docker.io/library/busybox:latest
    localhost:5000/app@sha256:…     → registry localhost:5000, repository app, by digest
    oci:/path/to/layout:tag         → an OCI layout directory
    docker-archive:/path/image.tar  → a `docker save` tarball
    docker-daemon:app:1.0           → the local Docker engine
    docker://busybox                → explicitly a registry

Parsed once, here; everything else works with these values.

A reference a user gives may carry credentials (`user:PASS@host/app`, never valid here): every
message quotes it through `redact.reference`, which masks the user-info whatever the password holds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from enclaver_rules import redact
from enclaver_rules.oci.digest import Digest

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_PATH = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_TAG = re.compile(r"^[\w][\w.-]{0,127}$")
_DOMAIN = re.compile(r"^(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*"
                     r"(?::[0-9]+)?$|^\[[0-9a-fA-F:.]+\](?::[0-9]+)?$")


class BadReference(ValueError):
    """A reference that cannot be parsed; carries a fix. Its text is redacted (it quotes the input)."""

    def __init__(self, message: str, fix: str) -> None:
        message, fix = redact.text(message), redact.text(fix)
        super().__init__(message)
        self.message = message
        self.fix = fix


def _quoted(text: str) -> str:
    """The reference as given, for a message: quoted, with any user-info masked."""
    return repr(redact.reference(text))


@dataclass(frozen=True, slots=True)
class Reference:
    """A registry image: `registry/repository[:tag][@digest]`, normalised."""

    registry: str
    repository: str
    tag: str | None = None
    digest: Digest | None = None

    @classmethod
    def parse(cls, text: str) -> Reference:
        original = _quoted(text)
        if not text or any(c.isspace() for c in text):
            raise BadReference(f"{original} is not an image reference", "give e.g. registry.example.com/app:1.0")
        digest = None
        if "@" in text:
            text, _, digest_text = text.partition("@")
            if "@" in digest_text or "/" in digest_text:  # `user:PASS@host/app`: quote no part of it
                raise BadReference(f"{original}: what follows '@' is not a digest, and a user name and password "
                                   "cannot be part of an image reference",
                                   "remove everything up to the '@' and log in with `docker login HOST`; a digest "
                                   "is written app@sha256:<64 hex>")
            try:
                digest = Digest.parse(digest_text)
            except ValueError as e:
                raise BadReference(f"{original}: {e}", "copy the digest exactly, e.g. app@sha256:<64 hex>") from None
        first, slash, rest = text.partition("/")
        if slash and ("." in first or ":" in first or first == "localhost" or first.startswith("[")):
            registry, remainder = first, rest
        else:
            registry, remainder = DOCKER_HUB, text
        if registry in ("index.docker.io", "registry-1.docker.io"):
            registry = DOCKER_HUB
        if not _DOMAIN.match(registry):
            raise BadReference(f"{original}: {registry!r} is not a registry host", "write host[:port]/repository")
        tag = None
        name, colon, tag_text = remainder.rpartition(":")
        if colon and "/" not in tag_text:
            remainder, tag = name, tag_text
            if not _TAG.match(tag):
                raise BadReference(f"{original}: {tag!r} is not a valid tag",
                                      "tags are letters, digits, '_', '.' and '-', at most 128")
        if registry == DOCKER_HUB and "/" not in remainder:
            remainder = f"library/{remainder}"
        if not _PATH.match(remainder):
            fix = "repository names are lowercase" if remainder.lower() != remainder else \
                "use lowercase letters, digits and separators ('.', '_', '-', '/')"
            raise BadReference(f"{original}: {remainder!r} is not a valid repository name", fix)
        if tag is None and digest is None:
            tag = "latest"
        return cls(registry, remainder, tag, digest)

    @property
    def api_host(self) -> str:
        """The host that serves the registry API (Docker Hub's differs from its name)."""
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    @property
    def name(self) -> str:
        return f"{self.registry}/{self.repository}"

    @property
    def selector(self) -> str:
        """What to ask the registry for: the digest when pinned, else the tag."""
        return str(self.digest) if self.digest else str(self.tag)

    def with_digest(self, digest: Digest) -> Reference:
        return Reference(self.registry, self.repository, self.tag, digest)

    def __str__(self) -> str:
        out = self.name
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out


# ------------------------------------------------------------------------------------------------
# transports


@dataclass(frozen=True, slots=True)
class RegistryImage:
    ref: Reference

    def __str__(self) -> str:
        return str(self.ref)


@dataclass(frozen=True, slots=True)
class OciLayoutImage:
    path: str
    tag: str | None = None

    def __str__(self) -> str:
        return f"oci:{self.path}" + (f":{self.tag}" if self.tag else "")


@dataclass(frozen=True, slots=True)
class DockerArchiveImage:
    path: str

    def __str__(self) -> str:
        return f"docker-archive:{self.path}"


@dataclass(frozen=True, slots=True)
class DaemonImage:
    ref: Reference
    text: str  # as given: the engine also knows images by short ID

    def __str__(self) -> str:
        return f"docker-daemon:{self.text}"


ImageLocation = RegistryImage | OciLayoutImage | DockerArchiveImage | DaemonImage


def parse_image(text: str) -> ImageLocation:
    """Any image argument a command takes: a registry reference or a skopeo-style transport."""
    if text.startswith("oci:"):
        path, _, tag = text[4:].partition(":")  # as skopeo: the path itself cannot contain ':'
        if not path:
            raise BadReference(f"{_quoted(text)} names no directory", "write oci:PATH[:TAG]")
        return OciLayoutImage(path, tag or None)
    if text.startswith("docker-archive:"):
        path = text[len("docker-archive:"):]
        if not path:
            raise BadReference(f"{_quoted(text)} names no file", "write docker-archive:PATH")
        return DockerArchiveImage(path)
    if text.startswith("docker-daemon:"):
        inner = text[len("docker-daemon:"):]
        return DaemonImage(Reference.parse(inner), inner)
    if text.startswith("docker://"):
        return RegistryImage(Reference.parse(text[len("docker://"):]))
    if "://" in text:
        raise BadReference(f"{_quoted(text)}: unknown transport", "use a reference, oci:, docker-archive:, docker-daemon: or docker://")
    return RegistryImage(Reference.parse(text))
