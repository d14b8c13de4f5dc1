"""OCI 1.1 referrers: artifact manifests (pure), the tag schema fallback against a real distribution 2.8
registry (which has no referrers API), and the referrers API against a small in-process fake."""

from __future__ import annotations

import base64
import http.server
import json
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest

from enclaver_rules.errors import InvalidInput, OperationFailed
from enclaver_rules.oci import mediatypes as mt
from enclaver_rules.oci.digest import Digest, DigestMismatch
from enclaver_rules.oci.layer import Entry
from enclaver_rules.oci.model import Descriptor
from enclaver_rules.oci.mutate import canonical_json
from enclaver_rules.oci.reference import Reference
from enclaver_rules.oci.referrers import (
    CREATED,
    EMPTY_DESCRIPTOR,
    EMPTY_DIGEST,
    EMPTY_JSON,
    KMS_KEY_POLICY,
    MEASUREMENTS,
    TITLE,
    ArtifactFile,
    add_referrer,
    artifact_manifest,
    artifact_type_of,
    attach,
    fallback_tag,
    fetch_artifact,
    list_referrers,
    parse_artifact,
    referrer_entry,
    resolve_subject,
)
from enclaver_rules.oci.registry import Registry
from enclaver_rules.oci.store import Store
from enclaver_rules.oci.transfer import load_stored, push
from oci_helpers import make_layout

EPOCH = 1_700_000_000  # 2023-11-14T22:13:20Z
SUBJECT = Descriptor(mt.OCI_MANIFEST, Digest.of(b"an image manifest"), 17)


def measurements_json() -> bytes:
    pcr = os.urandom(48).hex()  # unique per test: blobs are shared by digest across the registry's repositories
    return json.dumps({"Measurements": {"HashAlgorithm": "Sha384 { ... }", "PCR0": pcr, "PCR1": "1" * 96,
                                        "PCR2": "2" * 96}}, indent=2).encode() + b"\n"


def policy_json() -> bytes:
    return json.dumps({"Version": "2012-10-17", "Statement": [{"Sid": "x", "Effect": "Deny", "Principal": "*",
                                                               "Action": "kms:Decrypt", "Resource": "*"}]}).encode()


# -- pure ------------------------------------------------------------------------------------------


def test_empty_descriptor_is_the_digest_of_two_bytes() -> None:
    assert Digest.of(EMPTY_JSON) == EMPTY_DIGEST and EMPTY_JSON == b"{}"
    assert EMPTY_DESCRIPTOR.to_json() == {"mediaType": "application/vnd.oci.empty.v1+json", "size": 2,
                                          "digest": "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"}


def test_artifact_manifest_shape() -> None:
    data = measurements_json()
    raw = artifact_manifest(SUBJECT, MEASUREMENTS.artifact_type, [MEASUREMENTS.file(data)], created=EPOCH,
                            annotations={"dev.enclaver.name": "hello"})
    doc = json.loads(raw)
    assert doc == {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "artifactType": "application/vnd.enclaver.measurements.v1",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "size": 2,
                   "digest": "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"},
        "layers": [{"mediaType": "application/vnd.enclaver.measurements.v1+json", "digest": str(Digest.of(data)),
                    "size": len(data), "annotations": {TITLE: "measurements.json"}}],
        "subject": {"mediaType": mt.OCI_MANIFEST, "digest": str(SUBJECT.digest), "size": 17},
        "annotations": {CREATED: "2023-11-14T22:13:20Z", "dev.enclaver.name": "hello"},
    }
    assert raw == canonical_json(doc)  # canonical: sorted keys, no whitespace
    again = artifact_manifest(SUBJECT, MEASUREMENTS.artifact_type, [MEASUREMENTS.file(data)], created=EPOCH,
                              annotations={"dev.enclaver.name": "hello"})
    assert again == raw  # deterministic: attaching twice names the same manifest
    parsed = parse_artifact(raw, "m")
    assert parsed.artifact_type == MEASUREMENTS.artifact_type and parsed.subject == SUBJECT
    assert parsed.config == EMPTY_DESCRIPTOR and [d.annotation(TITLE) for d in parsed.layers] == ["measurements.json"]


def test_two_files_are_two_layers_each_with_its_media_type() -> None:
    raw = artifact_manifest(SUBJECT, "application/vnd.example.bundle.v1",
                            [MEASUREMENTS.file(measurements_json()), KMS_KEY_POLICY.file(policy_json())], created=0)
    layers = json.loads(raw)["layers"]
    assert [(x["mediaType"], x["annotations"][TITLE]) for x in layers] == [
        ("application/vnd.enclaver.measurements.v1+json", "measurements.json"),
        ("application/vnd.enclaver.kms-key-policy.v1+json", "kms-key-policy.json")]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"artifact_type": "not a type"}, "not a media type"),
    ({"artifact_type": "application/"}, "not a media type"),
    ({"files": []}, "at least one file"),
    ({"files": [ArtifactFile("a.json", "application/json", b"{}")] * 2}, "repeat"),
    ({"files": [ArtifactFile("dir/a.json", "application/json", b"{}")]}, "plain file name"),
    ({"files": [ArtifactFile("a.json", "json", b"{}")]}, "not a media type"),
    ({"subject": Descriptor(mt.OCI_LAYER_GZIP, SUBJECT.digest, 1)}, "not an image manifest"),
])
def test_bad_artifacts_are_refused_before_anything_is_pushed(kwargs: dict[str, Any], message: str) -> None:
    args: dict[str, Any] = {"subject": SUBJECT, "artifact_type": "application/vnd.example.x.v1",
                            "files": [ArtifactFile("a.json", "application/json", b"{}")], **kwargs}
    with pytest.raises(InvalidInput, match=message):
        artifact_manifest(args["subject"], args["artifact_type"], args["files"], created=0)


def test_json_kinds_must_hold_json() -> None:
    with pytest.raises(InvalidInput, match=r"measurements\.json is not JSON"):
        MEASUREMENTS.file(b'{"Measurements": ')


def test_fallback_tag_schema() -> None:
    hex_ = "ab" * 32
    assert fallback_tag(Digest.parse(f"sha256:{hex_}")) == f"sha256-{hex_}"
    long = "cd" * 64
    assert fallback_tag(Digest.parse(f"sha512:{long}")) == f"sha512-{long[:64]}"  # <ref> cut to 64 characters
    assert re.fullmatch(r"[\w][\w.-]{0,127}", fallback_tag(Digest.parse(f"sha512:{long}")))


def test_referrer_entry_copies_artifact_type_and_annotations() -> None:
    raw = artifact_manifest(SUBJECT, KMS_KEY_POLICY.artifact_type, [KMS_KEY_POLICY.file(policy_json())], created=EPOCH,
                            annotations={"x": "y"})
    assert referrer_entry(raw) == {"mediaType": mt.OCI_MANIFEST, "digest": str(Digest.of(raw)), "size": len(raw),
                                   "artifactType": KMS_KEY_POLICY.artifact_type,
                                   "annotations": {CREATED: "2023-11-14T22:13:20Z", "x": "y"}}
    # a manifest without artifactType is listed under its config's media type (distribution-spec 1.1)
    plain = canonical_json({"schemaVersion": 2, "mediaType": mt.OCI_MANIFEST,
                            "config": {"mediaType": "application/vnd.example.config.v1+json",
                                       "digest": str(EMPTY_DIGEST), "size": 2}, "layers": []})
    assert referrer_entry(plain)["artifactType"] == "application/vnd.example.config.v1+json"
    assert "annotations" not in referrer_entry(plain)


def test_add_referrer_appends_once_and_keeps_other_tools_entries() -> None:
    theirs = {"mediaType": mt.OCI_MANIFEST, "digest": "sha256:" + "1" * 64, "size": 9,
              "artifactType": "application/vnd.dev.cosign.artifact.sig.v1+json", "x-unknown": {"kept": True}}
    ours = {"mediaType": mt.OCI_MANIFEST, "digest": "sha256:" + "2" * 64, "size": 10, "artifactType": "a/b"}
    first = add_referrer(None, theirs)
    assert first is not None and json.loads(first) == {"schemaVersion": 2, "mediaType": mt.OCI_INDEX,
                                                       "manifests": [theirs]}
    second = add_referrer(first, ours)
    assert second is not None and json.loads(second)["manifests"] == [theirs, ours]
    assert add_referrer(second, ours) is None  # already listed: nothing to push
    with pytest.raises(OperationFailed, match="not an OCI image index"):
        add_referrer(canonical_json({"schemaVersion": 2, "mediaType": mt.OCI_MANIFEST, "layers": []}), ours)
    with pytest.raises(OperationFailed, match="malformed descriptor"):
        add_referrer(canonical_json({"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": [{"size": 1}]}), ours)


# -- against distribution 2.8 (no referrers API: the tag schema fallback) ---------------------------


def _push_image(registry: Any, tmp_path: Path, repository: str) -> tuple[Registry, Descriptor]:
    layout = tmp_path / "layout"
    make_layout(str(layout), "v1", [[Entry.file("etc/hello", os.urandom(1000))]])
    src = Store(layout)
    image = load_stored(src, "v1", src.resolve("v1").digest)  # type: ignore[union-attr]
    reg = Registry(registry.address)
    push(image, src, Reference.parse(f"{registry.address}/{repository}:v1"), reg)
    subject = resolve_subject(reg, repository, "v1")
    assert subject == Descriptor(mt.OCI_MANIFEST, image.digest, len(image.manifest.raw))
    return reg, subject


def _blob_data(registry: Any, digest: Digest) -> Path:
    return Path(registry.root) / "data/docker/registry/v2/blobs/sha256" / digest.hex[:2] / digest.hex / "data"


@pytest.mark.services
def test_attach_list_and_fetch_through_the_fallback_tag(registry: Any, tmp_path: Path) -> None:
    repo = "referrers/app"
    reg, subject = _push_image(registry, tmp_path, repo)
    assert list_referrers(reg, repo, subject.digest) == []  # no API, no tag yet: no referrers
    measurements, policy = measurements_json(), policy_json()

    m = attach(reg, repo, subject, MEASUREMENTS.artifact_type, [MEASUREMENTS.file(measurements)], created=EPOCH)
    p = attach(reg, repo, subject, KMS_KEY_POLICY.artifact_type, [KMS_KEY_POLICY.file(policy)], created=EPOCH)
    tag = f"sha256-{subject.digest.hex}"
    assert (m.discovery, m.tag, m.added) == ("tag", tag, True) and (p.discovery, p.added) == ("tag", True)

    raw, media_type = reg.get_manifest(repo, tag)
    index = json.loads(raw)
    assert media_type == mt.OCI_INDEX and index["mediaType"] == mt.OCI_INDEX and index["schemaVersion"] == 2
    assert [(e["digest"], e["artifactType"], e["annotations"][CREATED]) for e in index["manifests"]] == [
        (str(m.digest), MEASUREMENTS.artifact_type, "2023-11-14T22:13:20Z"),
        (str(p.digest), KMS_KEY_POLICY.artifact_type, "2023-11-14T22:13:20Z")]

    again = attach(reg, repo, subject, MEASUREMENTS.artifact_type, [MEASUREMENTS.file(measurements)], created=EPOCH)
    assert (again.digest, again.added) == (m.digest, False)
    assert reg.get_manifest(repo, tag)[0] == raw  # no duplicate, the index was not even rewritten

    listed = list_referrers(reg, repo, subject.digest)
    assert [d.digest for d in listed] == [m.digest, p.digest]
    assert [artifact_type_of(d) for d in listed] == [MEASUREMENTS.artifact_type, KMS_KEY_POLICY.artifact_type]
    only = list_referrers(reg, repo, subject.digest, KMS_KEY_POLICY.artifact_type)
    assert [d.digest for d in only] == [p.digest]

    store = Store(tmp_path / "fetched").init()
    artifact = fetch_artifact(reg, repo, only[0], store, subject=subject.digest)
    assert artifact.file("kms-key-policy.json").data == policy
    assert (artifact.artifact_type, artifact.subject) == (KMS_KEY_POLICY.artifact_type, subject)
    assert artifact.files[0].media_type == KMS_KEY_POLICY.media_type
    assert fetch_artifact(reg, repo, m.digest, store).file("measurements.json").data == measurements

    image_raw, _ = reg.get_manifest(repo, "v1")
    assert Digest.of(image_raw) == subject.digest  # the image is untouched: same digest as before


@pytest.mark.services
def test_tampered_artifact_blob_is_refused(registry: Any, tmp_path: Path) -> None:
    repo = "referrers/tampered"
    reg, subject = _push_image(registry, tmp_path, repo)
    measurements = measurements_json()
    m = attach(reg, repo, subject, MEASUREMENTS.artifact_type, [MEASUREMENTS.file(measurements)], created=EPOCH)
    data = _blob_data(registry, Digest.of(measurements))
    original = data.read_bytes()
    data.write_bytes(original.replace(b"PCR1", b"PCR9"))  # same length, other bytes
    try:
        store = Store(tmp_path / "s").init()
        with pytest.raises(DigestMismatch, match="content is sha256:"):
            fetch_artifact(reg, repo, m.digest, store, subject=subject.digest)
        assert not store.has(Digest.of(measurements))  # nothing kept
    finally:
        data.write_bytes(original)


@pytest.mark.services
def test_lying_referrers_entries_are_refused(registry: Any, tmp_path: Path) -> None:
    repo = "referrers/liar"
    reg, subject = _push_image(registry, tmp_path, repo)
    measurements = measurements_json()
    m = attach(reg, repo, subject, MEASUREMENTS.artifact_type, [MEASUREMENTS.file(measurements)], created=EPOCH)
    store = Store(tmp_path / "s").init()

    # the list says another size than the manifest has
    listed = list_referrers(reg, repo, subject.digest)[0]
    with pytest.raises(DigestMismatch, match="referrers list says"):
        fetch_artifact(reg, repo, Descriptor(listed.media_type, listed.digest, listed.size + 1), store)

    # the artifact belongs to another image
    with pytest.raises(OperationFailed, match="refers to"):
        fetch_artifact(reg, repo, m.digest, store, subject=Digest.of(b"another image"))

    # a manifest whose layer names the right digest with the wrong size
    wrong = json.loads(artifact_manifest(subject, MEASUREMENTS.artifact_type, [MEASUREMENTS.file(measurements)],
                                         created=EPOCH + 1))
    wrong["layers"][0]["size"] += 5
    raw = canonical_json(wrong)
    reg.put_manifest(repo, str(Digest.of(raw)), raw, mt.OCI_MANIFEST)
    with pytest.raises(DigestMismatch, match=r"got \d+ of \d+ bytes"):
        fetch_artifact(reg, repo, Digest.of(raw), store)
    assert not store.has(Digest.of(measurements))


@pytest.mark.services
def test_a_tag_that_is_not_an_index_is_reported_not_overwritten(registry: Any, tmp_path: Path) -> None:
    repo = "referrers/squatted"
    reg, subject = _push_image(registry, tmp_path, repo)
    image_raw, _ = reg.get_manifest(repo, "v1")
    reg.put_manifest(repo, fallback_tag(subject.digest), image_raw, mt.OCI_MANIFEST)  # someone used the tag
    with pytest.raises(OperationFailed, match="not an OCI image index"):
        attach(reg, repo, subject, MEASUREMENTS.artifact_type, [MEASUREMENTS.file(measurements_json())], created=EPOCH)
    assert reg.get_manifest(repo, fallback_tag(subject.digest))[0] == image_raw
    with pytest.raises(OperationFailed, match="not an OCI image index"):
        list_referrers(reg, repo, subject.digest)


# -- a registry with the referrers API (in-process fake) ----------------------------------------------


class _Fake(http.server.BaseHTTPRequestHandler):
    """Just enough of distribution-spec 1.1: blobs, manifests, and the referrers API (one entry per page)."""

    mode = "api"  # api: OCI-Subject + API; quiet: API without the header; none: no API; elsewhere: next page on another host
    blobs: dict[str, bytes]
    manifests: dict[str, tuple[bytes, str]]
    requests: list[str]

    def log_message(self, *args: object) -> None:
        pass

    def _route(self) -> tuple[str, str, str]:
        path = urlsplit(self.path).path
        match = re.match(r"^/v2/(.+)/(blobs|manifests|referrers)/(.*)$", path)
        return (match.group(1), match.group(2), match.group(3)) if match else ("", path, "")

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def do_HEAD(self) -> None:
        _, kind, rest = self._route()
        found = kind == "blobs" and rest in self.blobs
        self._send(200 if found else 404, headers={"Docker-Content-Digest": rest} if found else {})

    def do_POST(self) -> None:
        self._send(202, headers={"Location": "/upload/1"})

    def do_PUT(self) -> None:
        self.requests.append(f"PUT {urlsplit(self.path).path}")
        body = self._body()
        if self.path.startswith("/upload/"):
            digest = parse_qs(urlsplit(self.path).query)["digest"][0]
            assert str(Digest.of(body)) == digest
            self.blobs[digest] = body
            self._send(201)
            return
        name, _, ref = self._route()
        digest = str(Digest.of(body))
        self.manifests[f"{name}:{ref}"] = self.manifests[f"{name}:{digest}"] = (body, self.headers["Content-Type"])
        headers = {"Docker-Content-Digest": digest}
        subject = json.loads(body).get("subject")
        if subject and self.mode in ("api", "elsewhere"):
            headers["OCI-Subject"] = subject["digest"]
        self._send(201, headers=headers)

    def do_GET(self) -> None:
        self.requests.append(f"GET {urlsplit(self.path).path}")
        name, kind, rest = self._route()
        if kind == "blobs" and rest in self.blobs:
            self._send(200, self.blobs[rest])
        elif kind == "manifests" and f"{name}:{rest}" in self.manifests:
            body, media_type = self.manifests[f"{name}:{rest}"]
            self._send(200, body, {"Content-Type": media_type, "Docker-Content-Digest": str(Digest.of(body))})
        elif kind == "referrers" and self.mode != "none":
            self._referrers(name, rest)
        else:
            self._send(404, b'{"errors":[{"code":"NOT_FOUND","message":"no"}]}')

    def _referrers(self, name: str, subject: str) -> None:
        query = parse_qs(urlsplit(self.path).query)
        wanted = query.get("artifactType", [None])[0]
        entries = []
        for key, (body, _) in sorted(self.manifests.items()):
            doc = json.loads(body)
            if key.startswith(f"{name}:sha256:") and (doc.get("subject") or {}).get("digest") == subject:
                entries.append({"mediaType": mt.OCI_MANIFEST, "digest": key.split(":", 1)[1], "size": len(body),
                                "artifactType": doc.get("artifactType") or doc["config"]["mediaType"],
                                "annotations": doc.get("annotations") or {}})
        entries = [e for e in entries if wanted is None or e["artifactType"] == wanted]
        page = int(query.get("page", ["0"])[0])
        headers = {"Content-Type": mt.OCI_INDEX}
        if wanted:
            headers["OCI-Filters-Applied"] = "artifactType"
        if page + 1 < len(entries):
            rest = urlencode({**({"artifactType": wanted} if wanted else {}), "page": page + 1})
            host = "other.example:1" if self.mode == "elsewhere" else self.headers["Host"]
            headers["Link"] = f'<http://{host}/v2/{name}/referrers/{subject}?{rest}>; rel="next"'
        body = canonical_json({"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": entries[page:page + 1]})
        self._send(200, body, headers)


@pytest.fixture
def fake() -> Iterator[tuple[str, type[_Fake]]]:
    handler: type[_Fake] = type("Fake", (_Fake,), {"blobs": {}, "manifests": {}, "requests": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}", handler
    server.shutdown()
    server.server_close()


def _fake_image(reg: Registry, handler: type[_Fake]) -> Descriptor:
    config = b'{"architecture":"amd64","os":"linux"}'
    handler.blobs[str(Digest.of(config))] = config
    raw = canonical_json({"schemaVersion": 2, "mediaType": mt.OCI_MANIFEST,
                          "config": {"mediaType": mt.OCI_CONFIG, "digest": str(Digest.of(config)), "size": len(config)},
                          "layers": []})
    reg.put_manifest("app", "v1", raw, mt.OCI_MANIFEST)
    return resolve_subject(reg, "app", "v1")


@pytest.mark.parametrize("mode", ["api", "quiet"])
def test_a_registry_with_the_referrers_api_needs_no_fallback_tag(fake: tuple[str, type[_Fake]], mode: str,
                                                                 tmp_path: Path) -> None:
    host, handler = fake
    handler.mode = mode
    reg = Registry(host)
    subject = _fake_image(reg, handler)
    policy = policy_json()
    m = attach(reg, "app", subject, MEASUREMENTS.artifact_type, [MEASUREMENTS.file(measurements_json())], created=EPOCH)
    p = attach(reg, "app", subject, KMS_KEY_POLICY.artifact_type, [KMS_KEY_POLICY.file(policy)], created=EPOCH)
    assert (m.discovery, m.tag, p.discovery) == ("api", None, "api")
    assert not any(fallback_tag(subject.digest) in r for r in handler.requests)  # the tag was never read or written
    probes = [r for r in handler.requests if r.startswith("GET /v2/app/referrers/")]
    assert len(probes) == (0 if mode == "api" else 2)  # OCI-Subject answers the question without a probe
    listed = list_referrers(reg, "app", subject.digest)  # two pages, followed through Link
    assert sorted(d.digest for d in listed) == sorted([m.digest, p.digest])
    only = list_referrers(reg, "app", subject.digest, KMS_KEY_POLICY.artifact_type)
    assert [d.digest for d in only] == [p.digest]
    got = fetch_artifact(reg, "app", only[0], Store(tmp_path / "s").init(), subject=subject.digest)
    assert got.file("kms-key-policy.json").data == policy


def test_a_registry_without_the_api_gets_the_fallback_tag(fake: tuple[str, type[_Fake]]) -> None:
    host, handler = fake
    handler.mode = "none"
    reg = Registry(host)
    subject = _fake_image(reg, handler)
    m = attach(reg, "app", subject, MEASUREMENTS.artifact_type, [MEASUREMENTS.file(measurements_json())], created=EPOCH)
    assert (m.discovery, m.tag) == ("tag", fallback_tag(subject.digest))
    assert f"PUT /v2/app/manifests/{fallback_tag(subject.digest)}" in handler.requests
    assert [d.digest for d in list_referrers(reg, "app", subject.digest)] == [m.digest]


def test_a_next_page_on_another_host_is_not_followed(fake: tuple[str, type[_Fake]]) -> None:
    host, handler = fake
    handler.mode = "elsewhere"
    reg = Registry(host)
    subject = _fake_image(reg, handler)
    for kind, data in ((MEASUREMENTS, measurements_json()), (KMS_KEY_POLICY, policy_json())):
        attach(reg, "app", subject, kind.artifact_type, [kind.file(data)], created=EPOCH)
    with pytest.raises(OperationFailed, match=r"next page is on other\.example:1"):
        list_referrers(reg, "app", subject.digest)


def test_empty_blob_is_pushed_with_the_artifact(fake: tuple[str, type[_Fake]]) -> None:
    host, handler = fake
    reg = Registry(host)
    subject = _fake_image(reg, handler)
    attach(reg, "app", subject, MEASUREMENTS.artifact_type, [MEASUREMENTS.file(measurements_json())], created=EPOCH)
    assert handler.blobs[str(EMPTY_DIGEST)] == b"{}" == base64.b64decode("e30=")
