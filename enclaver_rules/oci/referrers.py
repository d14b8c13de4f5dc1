"""OCI 1.1 referrers: attach small artifacts (measurements.json, a KMS key policy) to a pushed image.

Why referrers and not a tag of their own: an artifact whose manifest names the image in `subject`
travels with the image's digest. Anyone holding `repo@sha256:…` can ask the registry "what refers
to this?" and get the measurements and the key policy for exactly those bytes, with no naming
convention to agree on and no way to attach them to the wrong build by a tag typo.

Rules implemented (written from the OCI image-spec 1.1 and distribution-spec 1.1 texts as we know
them; see "open points" below for where we chose):

image-spec 1.1, manifest.md / descriptor.md / manifest.md#guidelines-for-artifact-usage
  * an artifact is an image manifest (`application/vnd.oci.image.manifest.v1+json`) whose
    `artifactType` says what it is; `artifactType` MUST be set when the config is the empty
    descriptor, and MUST be an RFC 6838 media type (we check the §4.2 name syntax);
  * the config is the empty descriptor: `application/vnd.oci.empty.v1+json`, digest of the two
    bytes `{}` (sha256:44136fa…aff8a), size 2; the blob is still pushed (registries check it);
  * each file is one layer with its own media type and an `org.opencontainers.image.title`
    annotation (the file name, as oras does); at least one layer (the spec's portability SHOULD);
  * `subject` is the descriptor (mediaType, digest, size) of the image manifest or index;
  * `org.opencontainers.image.created` is RFC 3339, from the build's SOURCE_DATE_EPOCH, never the
    clock: the same inputs give the same artifact digest, which is what makes attaching twice a
    no-op instead of a second entry.

distribution-spec 1.1, "Pushing Manifests with Subject", "Listing Referrers", "Referrers Tag Schema"
  * the artifact manifest is pushed by digest (no tag) to the subject's repository;
  * a registry that processed `subject` answers the push with `OCI-Subject: <subject digest>`;
    then the registry lists it and nothing more is done;
  * without that header we ask the referrers API (`GET /v2/<name>/referrers/<digest>`); if it
    answers 200 and lists the artifact, nothing more is done (a registry that supports the API
    but omits the header still serves readers through the API);
  * otherwise (404: no referrers API, e.g. distribution 2.8) the tag schema fallback:
    1. pull the index at tag `<alg>-<ref>` (`sha256-<hex>`; characters not allowed in a tag
       become `-`, `<ref>` is cut to 64 characters);
    2. anything other than an OCI image index there is reported as a failure, nothing is pushed;
    3. a 404 starts from an empty index;
    4. a descriptor already listed (same digest) is not added again;
    5. the new descriptor carries `artifactType` (the manifest's, else its config media type)
       and every annotation of the manifest;
    6. the index is pushed back to the same tag. Entries written by other tools are kept as they
       were (unknown fields included).
  * reading: the referrers API when it answers 200 (following `Link: <…>; rel="next"` pages on the
    same host only: the client would otherwise send our token elsewhere); `artifactType` is
    filtered here whether or not the registry says `OCI-Filters-Applied`; a 404 means the
    fallback tag, and a missing tag means no referrers.

The race: the fallback is read-modify-write of one tag with no lock. Two writers attaching to the
same image at the same moment can both read the old index, and the second push drops the first
writer's entry; the artifact manifest itself is still in the registry, just not listed. The spec
allows (does not require) conditional requests (`If-Match` on the ETag) to close this, and
distribution 2.8 does not honour them. Mitigation: attaching is idempotent, so running the attach
step again re-lists a lost entry; a release pipeline attaches from one job, not in parallel.
Also on distribution 2.8: it refuses an index naming a manifest it no longer has
(MANIFEST_BLOB_UNKNOWN), so a referrer deleted without updating the tag (the spec asks deleters
to update it) makes the tag unwritable until that entry is removed by hand.

Trust: `fetch_artifact` verifies the manifest against its digest (Registry.get_manifest) and every
blob it names against its descriptor (Registry.fetch_blob → Store.put), caps each blob's size,
and checks the artifact's `subject` when the caller says which image it expects: a referrers list
(API or tag) is only a claim, anyone with push access can write it.

HTTP goes through `Registry` only (the import rule keeps requests in registry.py). Two things it
lacks are done here with its public `request`: a bounded GET that tolerates 404 (the referrers
API) and a manifest PUT whose `OCI-Subject` header we can read.
"""

from __future__ import annotations

import functools
import io
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal
from urllib.parse import urlencode, urljoin, urlsplit

from enclaver_rules.errors import InvalidInput, OperationFailed
from enclaver_rules.oci import mediatypes as mt
from enclaver_rules.oci.digest import Digest, DigestMismatch
from enclaver_rules.oci.model import Descriptor, parse
from enclaver_rules.oci.mutate import canonical_json, rfc3339
from enclaver_rules.oci.registry import MAX_MANIFEST_BYTES, NotFound, Registry
from enclaver_rules.oci.store import CHUNK, Store

#: The empty JSON blob and its descriptor (image-spec 1.1, manifest.md "Guidance for an Empty Descriptor").
EMPTY_JSON = b"{}"
EMPTY_DIGEST = Digest.parse("sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a")
EMPTY_DESCRIPTOR = Descriptor(mt.OCI_EMPTY, EMPTY_DIGEST, len(EMPTY_JSON))

CREATED = "org.opencontainers.image.created"
TITLE = "org.opencontainers.image.title"
#: Header a registry sends back when it indexed the pushed manifest's `subject`.
OCI_SUBJECT = "OCI-Subject"
#: The largest artifact file we download: measurements and key policies are a few KiB (a KMS
#: key policy is at most 32 KiB); a manifest declaring gigabytes is refused before any byte moves.
MAX_ARTIFACT_FILE_BYTES = 16 << 20
#: Referrers API pages we follow before giving up (a loop of `next` links must end).
MAX_PAGES = 64

_RESTRICTED_NAME = r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}"
_MEDIA_TYPE = re.compile(rf"^{_RESTRICTED_NAME}/{_RESTRICTED_NAME}$")  # RFC 6838 §4.2
_NOT_IN_TAG = re.compile(r"[^A-Za-z0-9_.-]")
_NEXT_LINK = re.compile(r'<([^>]*)>\s*;\s*rel="?next"?', re.IGNORECASE)

Discovery = Literal["api", "tag"]


@dataclass(frozen=True, slots=True)
class ArtifactKind:
    """What an artifact is (its `artifactType`) and how its one file is typed and named."""

    artifact_type: str
    media_type: str
    filename: str

    def file(self, data: bytes) -> ArtifactFile:
        """The file for this kind; JSON kinds must hold JSON (a truncated file is caught here, not by a verifier)."""
        if self.media_type.endswith("+json"):
            try:
                json.loads(data)
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise InvalidInput(f"{self.filename} is not JSON: {e}", file=self.filename,
                                   fix="attach the file the build or `enclaver trust` wrote") from None
        return ArtifactFile(self.filename, self.media_type, data)


#: The artifact types say what the artifact is for; the layer media types say how to read the bytes.
MEASUREMENTS = ArtifactKind("application/vnd.enclaver.measurements.v1", "application/vnd.enclaver.measurements.v1+json",
                            "measurements.json")
KMS_KEY_POLICY = ArtifactKind("application/vnd.enclaver.kms-key-policy.v1",
                              "application/vnd.enclaver.kms-key-policy.v1+json", "kms-key-policy.json")


@dataclass(frozen=True, slots=True)
class ArtifactFile:
    """One file of an artifact: a layer blob named by its title annotation."""

    name: str
    media_type: str
    data: bytes

    @property
    def digest(self) -> Digest:
        return Digest.of(self.data)

    def descriptor(self) -> Descriptor:
        return Descriptor(self.media_type, self.digest, len(self.data), ((TITLE, self.name),))


@dataclass(frozen=True, slots=True)
class Attached:
    """The outcome of `attach`: the artifact manifest, and how readers will find it."""

    digest: Digest
    descriptor: Descriptor  # as a referrers list shows it (artifactType in `extra`)
    discovery: Discovery  # api: the registry lists it; tag: the fallback index at `tag` lists it
    tag: str | None = None
    added: bool = True  # False: the fallback index already listed it (nothing pushed to the tag)


@dataclass(frozen=True, slots=True)
class Artifact:
    """A downloaded artifact: every byte verified against the digest that names it."""

    digest: Digest
    artifact_type: str
    subject: Descriptor | None
    annotations: tuple[tuple[str, str], ...]
    files: tuple[ArtifactFile, ...]

    def file(self, name: str) -> ArtifactFile:
        for f in self.files:
            if f.name == name:
                return f
        raise OperationFailed(f"artifact {self.digest.short} has no file {name!r}",
                              fix=f"it holds: {', '.join(f.name or '(untitled)' for f in self.files)}")


@dataclass(frozen=True, slots=True)
class ParsedArtifact:
    """The parts of an artifact manifest that matter for referrers (model.Manifest drops them)."""

    artifact_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]
    subject: Descriptor | None
    annotations: tuple[tuple[str, str], ...]


# -- pure: manifest, index entry, fallback index -------------------------------------------------


def fallback_tag(subject: Digest) -> str:
    """The referrers tag schema: `<alg>-<ref>`, `<ref>` cut to 64 characters, others than [A-Za-z0-9_.-] → `-`."""
    return _NOT_IN_TAG.sub("-", subject.algorithm) + "-" + _NOT_IN_TAG.sub("-", subject.hex[:64])


def artifact_type_of(descriptor: Descriptor) -> str | None:
    """The `artifactType` a referrers list gave this descriptor (model.Descriptor keeps it in `extra`)."""
    value = dict(descriptor.extra).get("artifactType")
    return value if isinstance(value, str) else None


def _check_media_type(value: str, what: str) -> None:
    if not _MEDIA_TYPE.match(value):
        raise InvalidInput(f"{what} {value!r} is not a media type",
                           fix="write type/subtype as RFC 6838 §4.2 allows, e.g. application/vnd.example.thing.v1+json")


def artifact_manifest(subject: Descriptor, artifact_type: str, files: Sequence[ArtifactFile], *, created: int,
                      annotations: Mapping[str, str] | None = None) -> bytes:
    """The artifact manifest, canonical JSON: same inputs, same bytes, same digest (so attaching twice is idempotent).

    `created` is seconds since the epoch (the build's SOURCE_DATE_EPOCH), written as RFC 3339.
    """
    _check_media_type(artifact_type, "artifactType")
    if subject.media_type not in mt.MANIFESTS | mt.INDEXES:
        raise InvalidInput(f"subject {subject.digest.short} is a {subject.media_type}, not an image manifest or index",
                           fix="attach to the image's manifest (or its index)")
    if not files:
        raise InvalidInput("an artifact needs at least one file", fix="pass the file(s) to attach")
    names = [f.name for f in files]
    for f in files:
        _check_media_type(f.media_type, f"media type of {f.name!r}")
        if not f.name or "/" in f.name:
            raise InvalidInput(f"artifact file name {f.name!r} is not a plain file name", fix="name it like measurements.json")
    if len(set(names)) != len(names):
        raise InvalidInput(f"artifact file names repeat: {', '.join(sorted(names))}", fix="give each file its own name")
    notes = {**dict(annotations or {}), CREATED: rfc3339(created)}
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in notes.items()):
        raise InvalidInput("annotations must map strings to strings", fix="quote the values")
    return canonical_json({
        "schemaVersion": 2,
        "mediaType": mt.OCI_MANIFEST,
        "artifactType": artifact_type,
        "config": EMPTY_DESCRIPTOR.to_json(),
        "layers": [f.descriptor().to_json() for f in files],
        "subject": {"mediaType": subject.media_type, "digest": str(subject.digest), "size": subject.size},
        "annotations": notes,
    })


def _load_object(raw: bytes, where: str) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise OperationFailed(f"{where}: not JSON: {e}", fix="the registry holds something else here") from None
    if not isinstance(data, dict):
        raise OperationFailed(f"{where}: not a JSON object", fix="the registry holds something else here")
    return data


def parse_artifact(raw: bytes, where: str) -> ParsedArtifact:
    """An OCI image manifest read as an artifact: artifactType (else the config's media type), subject, layers."""
    data = _load_object(raw, where)
    if data.get("schemaVersion") != 2 or data.get("mediaType", mt.OCI_MANIFEST) != mt.OCI_MANIFEST:
        raise OperationFailed(f"{where}: not an OCI image manifest", fix="a referrer must be an OCI image manifest")
    layers = data.get("layers")
    if not isinstance(layers, list):
        raise OperationFailed(f"{where}: manifest without a layers list", fix="the artifact is corrupt")
    config = Descriptor.from_json(data.get("config"), where)
    artifact_type = data.get("artifactType") or config.media_type
    if not isinstance(artifact_type, str):
        raise OperationFailed(f"{where}: artifactType is not a string", fix="the artifact is corrupt")
    subject = Descriptor.from_json(data["subject"], f"{where} subject") if data.get("subject") is not None else None
    annotations = data.get("annotations") or {}
    if not isinstance(annotations, dict):
        raise OperationFailed(f"{where}: annotations are not an object", fix="the artifact is corrupt")
    return ParsedArtifact(artifact_type, config, tuple(Descriptor.from_json(d, where) for d in layers), subject,
                          tuple(sorted((str(k), str(v)) for k, v in annotations.items())))


def referrer_entry(raw: bytes, where: str = "artifact manifest") -> dict[str, Any]:
    """The descriptor a referrers list holds for this manifest: artifactType and every manifest annotation."""
    parsed = parse_artifact(raw, where)
    entry: dict[str, Any] = {"mediaType": mt.OCI_MANIFEST, "digest": str(Digest.of(raw)), "size": len(raw),
                             "artifactType": parsed.artifact_type}
    if parsed.annotations:
        entry["annotations"] = dict(parsed.annotations)
    return entry


def _referrer(entry: Any, where: str) -> Descriptor:
    descriptor = Descriptor.from_json(entry, where)
    artifact_type = entry.get("artifactType")
    if artifact_type is not None and not isinstance(artifact_type, str):
        raise OperationFailed(f"{where}: artifactType of {descriptor.digest.short} is not a string",
                              fix="the referrers list is corrupt")
    return replace(descriptor, extra=(("artifactType", artifact_type),) if artifact_type else ())


def _index_entries(raw: bytes, media_type: str | None, where: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A referrers index: the document and its entries, each checked to be a descriptor."""
    data = _load_object(raw, where)
    kind = data.get("mediaType") or media_type
    manifests = data.get("manifests")
    if kind != mt.OCI_INDEX or data.get("schemaVersion") != 2 or not isinstance(manifests, list):
        raise OperationFailed(f"{where}: holds {kind or 'something'} that is not an OCI image index",
                              fix="the referrers tag schema expects an index here; another tool may have used the tag, "
                                  "remove or fix it by hand")
    for entry in manifests:
        if not isinstance(entry, dict):
            raise OperationFailed(f"{where}: an entry is not an object", fix="the referrers list is corrupt")
        _referrer(entry, where)
    return data, manifests


def add_referrer(current: bytes | None, entry: Mapping[str, Any], where: str = "referrers index",
                 media_type: str | None = None) -> bytes | None:
    """The fallback index with `entry` appended, or None when an entry of that digest is already listed.

    `current` None is the 404 case: start from an empty index. Entries already there are kept
    exactly as parsed (unknown fields too): other tools share this tag.
    """
    if current is None:
        document: dict[str, Any] = {"schemaVersion": 2, "mediaType": mt.OCI_INDEX}
        manifests: list[dict[str, Any]] = []
    else:
        document, manifests = _index_entries(current, media_type, where)
    if any(m.get("digest") == entry["digest"] for m in manifests):
        return None
    return canonical_json({**document, "mediaType": mt.OCI_INDEX, "manifests": [*manifests, dict(entry)]})


def _filter(descriptors: Iterable[Descriptor], artifact_type: str | None) -> list[Descriptor]:
    return [d for d in descriptors if artifact_type is None or artifact_type_of(d) == artifact_type]


# -- HTTP through Registry -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Reply:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes


def _call(registry: Registry, method: str, url: str, repository: str, *, ok: tuple[int, ...], what: str,
          headers: dict[str, str] | None = None, data: bytes | None = None,
          limit: int = MAX_MANIFEST_BYTES) -> _Reply:
    """One request whose body is read whole but bounded: what `Registry` would offer as a method."""
    response = registry.request(method, url, repository, headers=headers, data=data, stream=True, ok=ok, what=what)
    with response:
        body = bytearray()
        try:
            for chunk in response.iter_content(CHUNK):
                body += chunk
                if len(body) > limit:
                    raise OperationFailed(f"{registry.host}: {what}: answer larger than {limit} bytes",
                                          fix="the registry does not answer as the OCI distribution spec says")
        except OSError as e:  # requests' errors are OSErrors; this module may not import requests
            raise OperationFailed(f"{registry.host}: {what}: transfer failed: {e}", fix="try again") from None
        return _Reply(response.status_code, {k.lower(): v for k, v in response.headers.items()}, bytes(body))


def _put_manifest(registry: Registry, repository: str, raw: bytes, media_type: str) -> tuple[Digest, str | None]:
    """Push a manifest by digest; its digest and the `OCI-Subject` header, if the registry sent one.

    Registry.put_manifest does the same check but cannot hand back the header.
    """
    digest = Digest.of(raw)
    reply = _call(registry, "PUT", registry.url(repository, f"manifests/{digest}"), repository, ok=(200, 201, 202),
                  headers={"Content-Type": media_type}, data=raw, what=f"push artifact {repository}@{digest.short}")
    served = reply.headers.get("docker-content-digest")
    if served and served != str(digest):
        raise DigestMismatch(f"{registry.host}: stored the artifact manifest as {served}, we sent {digest}",
                             fix="the registry rewrote the manifest; do not trust this registry")
    return digest, reply.headers.get(OCI_SUBJECT.lower())


def _api_referrers(registry: Registry, repository: str, subject: Digest,
                   artifact_type: str | None) -> list[Descriptor] | None:
    """All referrers from the referrers API (every page), or None when the registry has no such API (404)."""
    url = registry.url(repository, f"referrers/{subject}")
    if artifact_type:
        url += "?" + urlencode({"artifactType": artifact_type})
    origin = urlsplit(url)
    found: list[Descriptor] = []
    for page in range(MAX_PAGES):
        what = f"referrers of {repository}@{subject.short}" + (f" (page {page + 1})" if page else "")
        reply = _call(registry, "GET", url, repository, ok=(200, 404), what=what,
                      headers={"Accept": mt.OCI_INDEX})
        if reply.status == 404:
            if page:
                raise OperationFailed(f"{registry.host}: {what}: HTTP 404 on a page it linked to",
                                      fix="the registry's referrers pages changed while listing; try again")
            return None
        _, manifests = _index_entries(reply.body, reply.headers.get("content-type", "").split(";")[0].strip() or None,
                                      f"{registry.host}: {what}")
        found += [_referrer(m, what) for m in manifests]
        link = _NEXT_LINK.search(reply.headers.get("link", ""))
        if not link:
            return _filter(found, artifact_type)
        url = urljoin(url, link.group(1))
        target = urlsplit(url)
        if (target.scheme, target.netloc) != (origin.scheme, origin.netloc):
            raise OperationFailed(f"{registry.host}: {what}: the next page is on {target.netloc or '?'}",
                                  fix="refusing to follow (our credentials would go with it); check the registry")
    raise OperationFailed(f"{registry.host}: referrers of {repository}@{subject.short}: more than {MAX_PAGES} pages",
                          fix="the registry's Link headers loop; report it to the registry's operator")


def _fallback_index(registry: Registry, repository: str, subject: Digest) -> tuple[bytes, str] | None:
    try:
        return registry.get_manifest(repository, fallback_tag(subject))
    except NotFound:
        return None


# -- the API ---------------------------------------------------------------------------------------


def resolve_subject(registry: Registry, repository: str, selector: str) -> Descriptor:
    """The descriptor of the image at `selector` (tag or digest): what an artifact's `subject` names.

    Read from the registry (digest-verified when pinned), so an artifact is never attached to an
    image that is not in the repository.
    """
    raw, media_type = registry.get_manifest(repository, selector)
    node = parse(raw, media_type, f"{registry.host}/{repository}:{selector}")
    return Descriptor(node.media_type, node.digest, len(raw))


def attach(registry: Registry, repository: str, subject: Descriptor, artifact_type: str,
           files: Sequence[ArtifactFile], *, created: int, annotations: Mapping[str, str] | None = None) -> Attached:
    """Push an artifact referring to `subject` and make it discoverable (referrers API, else the fallback tag).

    Blobs first (the empty config, then each file), then the manifest by digest, then — only when
    the registry did not index the subject itself — the fallback index at `sha256-<hex>`. The
    image (manifest, tags) is not touched. Idempotent: the same inputs give the same manifest, which
    the registry already has and the index already lists. See the module docstring for the race.
    """
    raw = artifact_manifest(subject, artifact_type, files, created=created, annotations=annotations)
    blobs = [(EMPTY_DESCRIPTOR, EMPTY_JSON), *((f.descriptor(), f.data) for f in files)]
    for descriptor, data in blobs:
        registry.push_blob(repository, descriptor, functools.partial(io.BytesIO, data))
    digest, oci_subject = _put_manifest(registry, repository, raw, mt.OCI_MANIFEST)
    entry = referrer_entry(raw)
    listed = _referrer(entry, "artifact manifest")
    if oci_subject and oci_subject.strip() == str(subject.digest):
        return Attached(digest, listed, "api")
    api = _api_referrers(registry, repository, subject.digest, artifact_type)  # filtered: fewer pages to read
    if api is not None and any(d.digest == digest for d in api):
        return Attached(digest, listed, "api")
    tag = fallback_tag(subject.digest)
    where = f"{registry.host}/{repository}:{tag}"
    current = _fallback_index(registry, repository, subject.digest)
    updated = add_referrer(current[0] if current else None, entry, where, current[1] if current else None)
    if updated is None:
        return Attached(digest, listed, "tag", tag, added=False)
    registry.put_manifest(repository, tag, updated, mt.OCI_INDEX)
    return Attached(digest, listed, "tag", tag)


def list_referrers(registry: Registry, repository: str, subject_digest: Digest,
                   artifact_type: str | None = None) -> list[Descriptor]:
    """Descriptors of the manifests that refer to `subject_digest`, optionally of one artifactType.

    The referrers API when the registry has it, else the fallback tag (no tag: no referrers). Each
    descriptor's artifactType is `artifact_type_of(d)`. These are claims: fetch with
    `fetch_artifact(..., subject=subject_digest)` to have them checked.
    """
    api = _api_referrers(registry, repository, subject_digest, artifact_type)
    if api is not None:
        return api
    found = _fallback_index(registry, repository, subject_digest)
    if found is None:
        return []
    where = f"{registry.host}/{repository}:{fallback_tag(subject_digest)}"
    _, manifests = _index_entries(found[0], found[1], where)
    return _filter((_referrer(m, where) for m in manifests), artifact_type)


def fetch_artifact(registry: Registry, repository: str, artifact: Descriptor | Digest, store: Store, *,
                   subject: Digest | None = None, max_size: int = MAX_ARTIFACT_FILE_BYTES) -> Artifact:
    """Download an artifact: its manifest (verified against its digest, and its size when a descriptor is given),
    then every blob it names into `store` (each verified as it streams; nothing kept on a mismatch).

    `subject`: the image the caller expects the artifact to describe; a referrers list entry that
    points at an artifact for another image is refused. The empty config is not downloaded: its
    content is fixed by its digest.
    """
    digest = artifact.digest if isinstance(artifact, Descriptor) else artifact
    where = f"{registry.host}/{repository}@{digest.short}"
    raw, _ = registry.get_manifest(repository, str(digest))
    if Digest.of(raw) != digest:  # get_manifest verifies a pinned digest; this module does not rely on it
        raise DigestMismatch(f"{where}: served content is {Digest.of(raw)}", fix="the registry serves tampered data")
    if isinstance(artifact, Descriptor) and artifact.size != len(raw):
        raise DigestMismatch(f"{where}: manifest is {len(raw)} bytes, the referrers list says {artifact.size}",
                             fix="the referrers list is corrupt or was tampered with")
    parsed = parse_artifact(raw, where)
    if subject is not None and (parsed.subject is None or parsed.subject.digest != subject):
        got = parsed.subject.digest if parsed.subject else "nothing"
        raise OperationFailed(f"{where}: the artifact refers to {got}, not {subject}",
                              fix="the referrers list names an artifact of another image; do not use it")
    wanted = [*(() if parsed.config == EMPTY_DESCRIPTOR else (parsed.config,)), *parsed.layers]
    for descriptor in wanted:
        if descriptor.size > max_size:
            raise OperationFailed(f"{where}: blob {descriptor.digest.short} is {descriptor.size} bytes "
                                  f"(at most {max_size} for an artifact file)", fix="this is not an enclaver artifact")
        registry.fetch_blob(repository, descriptor, store)
    files = tuple(ArtifactFile(d.annotation(TITLE) or "", d.media_type, store.read(d.digest)) for d in parsed.layers)
    return Artifact(digest, parsed.artifact_type, parsed.subject, parsed.annotations, files)
