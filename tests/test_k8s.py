"""`enclaver k8s manifest`: Deployments for the AWS Nitro Enclaves device plugin.

Checked against the Kubernetes API's own schemas: the JSON schemas kubernetes-validate (PyPI, pinned in
the `test` extra) generates from each release's OpenAPI document, strict flavour (an unknown field is
an error), for every release it ships, read with jsonschema. A missing schema fails, never skips.
The rules the API server enforces that a schema cannot say (huge page limits equal to requests,
CPU or memory beside huge pages, names, quantities) are checked as kube-apiserver's validation
does; each check is shown to catch a broken Deployment. Then the huge page arithmetic against
`runtime.allocator`, the device plugin's resource and node label, and the CLI on EIFs, build
directories and release images really built here (`enclaver eif build`, dev blob set, well under
a second each), with its hostile inputs.
"""

from __future__ import annotations

import copy
import functools
import importlib.resources
import io
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from referencing import Registry, Resource
from test_imports import _allowed, _imports

from conftest import REPO
from enclaver_rules.eif.blobs import write_dev_blobs
from enclaver_rules.errors import InvalidInput
from enclaver_rules.k8s import (
    CPU_RESOURCE,
    DEFAULT_NODE_SELECTOR,
    DEVICE_RESOURCE,
    HUGEPAGE_SIZES,
    Options,
    deployment,
    parse_node_selector,
    render,
    sizing,
)
from enclaver_rules.manifest.model import Defaults, Ingress, Manifest, Sources
from enclaver_rules.oci.layer import Entry, write_layer
from enclaver_rules.runtime import allocator
from oci_helpers import make_layout

SCHEMAS = "kubernetes_validate"
#: The releases the pinned kubernetes-validate must carry: the oldest and newest it ships (EKS's
#: supported releases lie between them).
REQUIRED_RELEASES = ("1.25.0", "1.37.0")
MiB = 1 << 20
IMAGE = "registry.example.com/web@sha256:" + "ab" * 32


# ---- the schemas ---------------------------------------------------------------------------------

def _schema_root() -> Any:
    try:
        root = importlib.resources.files(SCHEMAS) / "kubernetes-json-schema"
    except ModuleNotFoundError:
        pytest.fail("kubernetes-validate (the Kubernetes API's JSON schemas) is not installed: "
                    "run `.venv/bin/pip install -e '.[test]'`", pytrace=False)
    if not root.is_dir():
        pytest.fail(f"{root}: kubernetes-validate carries no schemas", pytrace=False)
    return root


def releases() -> list[str]:
    try:
        root = importlib.resources.files(SCHEMAS) / "kubernetes-json-schema"
        found = sorted((m.group(1) for m in (re.fullmatch(r"v(\d+\.\d+\.\d+)-local-strict", p.name)
                                             for p in root.iterdir()) if m),
                       key=lambda v: tuple(map(int, v.split("."))))
    except (ModuleNotFoundError, FileNotFoundError, NotADirectoryError):
        found = []
    return found or list(REQUIRED_RELEASES)  # collected anyway: each test then fails on the missing schema


@functools.cache
def validator(release: str) -> jsonschema.protocols.Validator:
    """Deployment (apps/v1) of one Kubernetes release, strict, with its definitions by `$ref`."""
    directory = _schema_root() / f"v{release}-local-strict"
    if not (directory / "deployment-apps-v1.json").is_file():
        pytest.fail(f"no Deployment schema for Kubernetes {release} in {directory}", pytrace=False)
    schema = json.loads((directory / "deployment-apps-v1.json").read_text())
    definitions = json.loads((directory / "_definitions.json").read_text())
    registry: Registry[Any] = Registry().with_resources(
        [(schema["$id"], Resource.from_contents(schema)), (definitions["$id"], Resource.from_contents(definitions))])
    cls = jsonschema.validators.validator_for(schema)
    return cls(schema, registry=registry)  # type: ignore[no-any-return]


def schema_errors(document: dict[str, Any], release: str = REQUIRED_RELEASES[-1]) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator(release).iter_errors(document)]


def test_our_reading_of_the_schemas_agrees_with_kubernetes_validates_own() -> None:
    import kubernetes_validate

    document = deployment(manifest(), 3 * MiB, Options(IMAGE))
    assert kubernetes_validate.validate(document, REQUIRED_RELEASES[-1], strict=True) == "1.37"
    broken = copy.deepcopy(document)
    MUTATIONS["misspelt field"](broken)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, REQUIRED_RELEASES[-1], strict=True)


def test_the_pinned_schemas_are_there() -> None:
    _schema_root()
    assert set(REQUIRED_RELEASES) <= set(releases()), releases()
    schema = json.loads((_schema_root() / "v1.37.0-local-strict" / "deployment-apps-v1.json").read_text())
    assert schema["additionalProperties"] is False and schema["$id"].endswith("/deployment/apps/v1")


# ---- the rules kube-apiserver adds (k8s.io/kubernetes pkg/apis/core/validation, apps/validation) --

_QUANTITY = re.compile(r"([0-9]+(?:\.[0-9]+)?)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?")
_SUFFIX = {None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
           "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


def quantity(text: Any) -> float:
    match = _QUANTITY.fullmatch(str(text)) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"{text!r} is not a Kubernetes quantity")
    return float(match.group(1)) * _SUFFIX[match.group(2)]


def api_rules(document: dict[str, Any]) -> list[str]:
    """What the API server would refuse in a Deployment that passed the schema."""
    found = []
    meta, spec = document["metadata"], document["spec"]
    pod = spec["template"]["spec"]
    if not (len(meta["name"]) <= 63 and _DNS_LABEL.fullmatch(meta["name"])):
        found.append(f"metadata.name {meta['name']!r} is not a DNS label")
    labels = spec["template"]["metadata"].get("labels", {})
    selector = spec["selector"]["matchLabels"]
    if not selector or any(labels.get(k) != v for k, v in selector.items()):
        found.append("spec.selector does not match the template's labels")
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for c in pod["containers"]:
        if not _DNS_LABEL.fullmatch(c["name"]):
            found.append(f"container name {c['name']!r} is not a DNS label")
        requests, limits = c["resources"].get("requests", {}), c["resources"].get("limits", {})
        for table in (requests, limits):
            for name, value in table.items():
                try:
                    quantity(value)
                except ValueError as e:
                    found.append(f"{name}: {e}")
        for name in set(requests) | set(limits):
            counted = name.startswith("hugepages-") or "/" in name  # huge pages and extended resources
            if counted and (name not in limits or requests.get(name, limits[name]) != limits[name]):
                found.append(f"{name}: the request must equal the limit")
            if name.startswith("hugepages-"):
                page = quantity(name.removeprefix("hugepages-"))
                if quantity(limits.get(name, requests.get(name))) % page:
                    found.append(f"{name}: not a whole number of pages")
                if not {"cpu", "memory"} & (set(requests) | set(limits)):
                    found.append("HugePages require cpu or memory")
            if "/" in name and quantity(limits.get(name, requests.get(name))) % 1:
                found.append(f"{name}: an extended resource is counted in whole units")
        for mount in c.get("volumeMounts", []):
            volume = volumes.get(mount["name"])
            if volume is None:
                found.append(f"volumeMount {mount['name']!r} names no volume")
            elif (volume.get("emptyDir") or {}).get("medium", "").startswith("HugePages-"):
                size = volume["emptyDir"]["medium"].removeprefix("HugePages-")
                if f"hugepages-{size}" not in limits:
                    found.append(f"volume {mount['name']!r}: medium {volume['emptyDir']['medium']} without that "
                                 "huge page resource")
        for port in c.get("ports", []):
            name = port.get("name", "x")
            if not (len(name) <= 15 and _DNS_LABEL.fullmatch(name) and "--" not in name and re.search("[a-z]", name)):
                found.append(f"port name {name!r} is not an IANA_SVC_NAME")
            if not 0 < port["containerPort"] < 65536:
                found.append(f"containerPort {port['containerPort']} out of range")
    return found


# ---- building blocks -----------------------------------------------------------------------------

def manifest(memory_mb: int = 1000, cpu_count: int = 2, ports: tuple[int, ...] = (8080, 8443),
             name: str = "web") -> Manifest:
    return Manifest(name=name, target=f"registry.example.com/{name.lower()}:release", sources=Sources("x:1"),
                    ingress=tuple(Ingress(p) for p in ports), defaults=Defaults(cpu_count, memory_mb))


def container(document: dict[str, Any]) -> dict[str, Any]:
    [only] = document["spec"]["template"]["spec"]["containers"]
    return only  # type: ignore[no-any-return]


VARIANTS = {
    "defaults": (manifest(), Options(IMAGE)),
    "1Gi-namespace-3-replicas": (manifest(4096), Options(IMAGE, namespace="enclaves", replicas=3,
                                                         hugepage_size="1Gi")),
    "no-ingress-own-labels-cpus": (manifest(512, 4, ()), Options(IMAGE, name="billing", enclave_cpus=True,
                                                                  node_selector=(("example.com/pool", "nitro"),
                                                                                 ("zone", ""))),
                                   ),
}


@pytest.mark.parametrize("release", releases())
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_deployment_is_valid_for_every_kubernetes_release(variant: str, release: str) -> None:
    m, options = VARIANTS[variant]
    document = deployment(m, 3 * MiB, options, {"PCR0": "00" * 48})
    assert schema_errors(document, release) == []
    assert api_rules(document) == []
    again = yaml.safe_load(render([document], ["a comment"]))  # what is printed is what was checked
    assert again == document and schema_errors(again, release) == []


MUTATIONS: dict[str, Callable[[dict[str, Any]], None]] = {
    "misspelt field": lambda d: container(d).update(resource=container(d).pop("resources")),
    "unknown top-level field": lambda d: d.update(status_message="hi"),
    "replicas as words": lambda d: d["spec"].update(replicas="three"),
    "containerPort as text": lambda d: container(d)["ports"][0].update(containerPort="8080"),
    "volumes as a map": lambda d: d["spec"]["template"]["spec"].update(volumes={"hugepages-2mi": {}}),
    "nodeSelector as a list": lambda d: d["spec"]["template"]["spec"].update(nodeSelector=["a=b"]),
    "wrong kind": lambda d: d.update(kind="Deploymnet"),
    "image as a list": lambda d: container(d).update(image=["a", "b"]),
}


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_the_schema_refuses_a_broken_deployment(mutation: str) -> None:
    """Proof that the validation is real: each broken copy fails, the original passes."""
    document = deployment(manifest(), 3 * MiB, Options(IMAGE))
    assert schema_errors(document) == []
    broken = copy.deepcopy(document)
    MUTATIONS[mutation](broken)
    assert schema_errors(broken), mutation


API_MUTATIONS: dict[str, Callable[[dict[str, Any]], None]] = {
    "hugepage request below limit": lambda d: container(d)["resources"]["requests"].update({"hugepages-2Mi": "2Mi"}),
    "device request missing from limits": lambda d: container(d)["resources"]["limits"].pop(DEVICE_RESOURCE),
    "no cpu or memory": lambda d: [container(d)["resources"][t].pop(k, None) for t in ("requests", "limits")
                                   for k in ("cpu", "memory")],
    "odd huge pages": lambda d: [container(d)["resources"][t].update({"hugepages-2Mi": "1001Mi"})
                                 for t in ("requests", "limits")],
    "half a device": lambda d: [container(d)["resources"][t].update({DEVICE_RESOURCE: "0.5"})
                                for t in ("requests", "limits")],
    "bad quantity": lambda d: container(d)["resources"]["requests"].update(cpu="a lot"),
    "selector misses labels": lambda d: d["spec"]["selector"]["matchLabels"].update(tier="x"),
    "volume of another page size": lambda d: d["spec"]["template"]["spec"]["volumes"][0]["emptyDir"].update(
        medium="HugePages-1Gi"),
    "long port name": lambda d: container(d)["ports"][0].update(name="ingress-port-8080"),
    "uppercase name": lambda d: d["metadata"].update(name="Web"),
}


@pytest.mark.parametrize("mutation", sorted(API_MUTATIONS))
def test_the_api_server_rules_catch_what_the_schema_cannot(mutation: str) -> None:
    document = deployment(manifest(), 3 * MiB, Options(IMAGE))
    broken = copy.deepcopy(document)
    API_MUTATIONS[mutation](broken)
    assert schema_errors(broken) == [] and api_rules(broken), mutation


# ---- what the Deployment asks for ----------------------------------------------------------------

def test_the_device_plugin_resources_node_label_and_huge_page_volume() -> None:
    document = deployment(manifest(1000), 3 * MiB, Options(IMAGE))
    c = container(document)
    pod = document["spec"]["template"]["spec"]
    for table in ("requests", "limits"):
        assert c["resources"][table][DEVICE_RESOURCE] == "1"
        assert c["resources"][table]["hugepages-2Mi"] == "1000Mi"
    assert DEVICE_RESOURCE == "aws.ec2.nitro/nitro_enclaves" and CPU_RESOURCE not in c["resources"]["limits"]
    assert {"cpu", "memory"} <= set(c["resources"]["requests"])
    assert pod["nodeSelector"] == {"aws-nitro-enclaves-k8s-dp": "enabled"} == dict(DEFAULT_NODE_SELECTOR)
    assert pod["volumes"] == [{"name": "hugepages-2mi", "emptyDir": {"medium": "HugePages-2Mi"}}]
    assert c["volumeMounts"] == [{"name": "hugepages-2mi", "mountPath": "/hugepages-2Mi"}]
    # the plugin hands in /dev/nitro_enclaves: no privileged mode, no hostPath; the entrypoint is the image's
    assert "securityContext" not in c and "securityContext" not in pod and "hostPath" not in json.dumps(document)
    assert "command" not in c and "args" not in c and c["image"] == IMAGE
    assert document["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}
    assert "namespace" not in document["metadata"]


def test_ingress_ports_become_container_ports() -> None:
    c = container(deployment(manifest(ports=(8080, 443, 17100)), 0, Options(IMAGE)))
    assert [(p["containerPort"], p["protocol"], p["name"]) for p in c["ports"]] == \
        [(8080, "TCP", "ingress-8080"), (443, "TCP", "ingress-443"), (17100, "TCP", "ingress-17100")]
    assert "ports" not in container(deployment(manifest(ports=()), 0, Options(IMAGE)))


def test_enclave_cpus_are_requested_only_when_asked() -> None:
    c = container(deployment(manifest(cpu_count=4), 0, Options(IMAGE, enclave_cpus=True)))
    assert c["resources"]["requests"][CPU_RESOURCE] == c["resources"]["limits"][CPU_RESOURCE] == "4"


def test_measurements_become_annotations() -> None:
    document = deployment(manifest(), 0, Options(IMAGE), {"PCR0": "aa" * 48, "PCR8": "bb" * 48, "HashAlgorithm": "x"})
    annotations = document["spec"]["template"]["metadata"]["annotations"]
    assert annotations["dev.enclaver/pcr0"] == "aa" * 48 and annotations["dev.enclaver/pcr8"] == "bb" * 48
    assert "dev.enclaver/hashalgorithm" not in annotations
    assert annotations["dev.enclaver/enclave-memory-mib"] == "1000"


@pytest.mark.parametrize("memory_mb, page, pages, text", [
    (1000, "2Mi", 500, "1000Mi"), (1001, "2Mi", 501, "1002Mi"), (4096, "2Mi", 2048, "4096Mi"),
    (4096, "1Gi", 4, "4Gi"), (1000, "1Gi", 1, "1Gi"), (1025, "1Gi", 2, "2Gi"), (64, "2Mi", 32, "64Mi"),
])
def test_huge_pages_are_the_allocators_memory_rounded_up(memory_mb: int, page: str, pages: int, text: str) -> None:
    eif_size = 5 * MiB + 1  # 6 MiB rounded, a floor of 24 MiB
    need = allocator.needs(manifest(memory_mb), eif_size)
    size = sizing(manifest(memory_mb), eif_size, page)
    assert (size.memory_mib, size.eif_min_mib, size.cpu_count) == (need.memory_mib, need.eif_min_mib, need.cpu_count)
    assert (size.pages, size.quantity) == (pages, text)
    c = container(deployment(manifest(memory_mb), eif_size, Options(IMAGE, hugepage_size=page)))
    assert c["resources"]["limits"][f"hugepages-{page}"] == c["resources"]["requests"][f"hugepages-{page}"] == text


@given(memory_mb=st.integers(64, 1 << 21), eif_mib=st.integers(0, 1 << 18),
       page=st.sampled_from(sorted(HUGEPAGE_SIZES)))
def test_huge_pages_cover_the_enclave_exactly_to_the_page(memory_mb: int, eif_mib: int, page: str) -> None:
    m, eif_size = manifest(memory_mb), eif_mib * MiB
    need = allocator.needs(m, eif_size)
    if need.memory_mib < need.eif_min_mib:
        with pytest.raises(InvalidInput) as e:
            sizing(m, eif_size, page)
        assert e.value.diagnostics[0].field == "defaults.memory_mb"
        assert f"defaults.memory_mb: {need.eif_min_mib}" in e.value.diagnostics[0].fix
        return
    size = sizing(m, eif_size, page)
    step = HUGEPAGE_SIZES[page]
    assert size.hugepages_mib >= need.memory_mib > size.hugepages_mib - step
    assert quantity(size.quantity) == size.hugepages_mib * MiB


def test_memory_below_the_eifs_floor_is_refused() -> None:
    with pytest.raises(InvalidInput) as e:
        deployment(manifest(64), 17 * MiB, Options(IMAGE))
    [d] = e.value.diagnostics
    assert d.field == "defaults.memory_mb" and "68 MiB" in d.message and "defaults.memory_mb: 68" in d.fix


@pytest.mark.parametrize("options, field", [
    (Options(IMAGE, replicas=0), "--replicas"), (Options(IMAGE, replicas=-2), "--replicas"),
    (Options(IMAGE, replicas=2**31), "--replicas"), (Options(IMAGE, namespace="Enclaves"), "--namespace"),
    (Options(IMAGE, namespace="a" * 64), "--namespace"), (Options(IMAGE, namespace="a.b"), "--namespace"),
    (Options(IMAGE, name="web_1"), "--name"), (Options(IMAGE, hugepage_size="4Ki"), "--hugepage-size"),
    (Options(IMAGE, node_selector=(("-bad", "x"),)), "--node-selector"),
    (Options(IMAGE, node_selector=(("k", "v w"),)), "--node-selector"),
    (Options(IMAGE, node_selector=(("a", "1"), ("a", "2"))), "--node-selector"),
    (Options("registry.example.com/web latest"), "--image"),
])
def test_bad_options_are_refused_naming_the_flag(options: Options, field: str) -> None:
    with pytest.raises(InvalidInput) as e:
        deployment(manifest(), 0, options)
    assert [d.field for d in e.value.diagnostics] == [field] and all(d.fix for d in e.value.diagnostics)


def test_a_manifest_name_kubernetes_cannot_take_asks_for_name() -> None:
    with pytest.raises(InvalidInput) as e:
        deployment(manifest(name="Web_Billing.v2"), 0, Options(IMAGE))
    [d] = e.value.diagnostics
    assert d.field == "name" and d.fix == "pass --name web-billing-v2"
    assert deployment(manifest(name="Web_Billing.v2"), 0, Options(IMAGE, name="web-billing-v2"))["metadata"][
        "name"] == "web-billing-v2"


@pytest.mark.parametrize("text, expected", [
    ("aws-nitro-enclaves-k8s-dp=enabled", ("aws-nitro-enclaves-k8s-dp", "enabled")),
    ("example.com/pool=nitro", ("example.com/pool", "nitro")), ("zone=", ("zone", "")),
    ("node.kubernetes.io/instance-type=m5.2xlarge", ("node.kubernetes.io/instance-type", "m5.2xlarge")),
])
def test_node_selectors_parse(text: str, expected: tuple[str, str]) -> None:
    assert parse_node_selector(text) == expected


@pytest.mark.parametrize("text", ["foo", "=x", "k=v w", "k=" + "v" * 64, "Example.COM/x=y", "a/b/c=d", "k=-v",
                                  "x" * 64 + "=y", "k=v\n"])
def test_hostile_node_selectors_are_refused(text: str) -> None:
    with pytest.raises(InvalidInput) as e:
        parse_node_selector(text)
    assert {d.field for d in e.value.diagnostics} == {"--node-selector"}


def test_the_package_stays_pure() -> None:
    """No I/O and no adapters: stdlib, yaml, pure modules, and the allocator's arithmetic."""
    for path in sorted((REPO / "enclaver_rules" / "k8s").glob("*.py")):
        for name in _imports(path):
            assert _allowed(str(path.relative_to(REPO)), name) or name.startswith("enclaver_rules.k8s.") or name in {
                "enclaver_rules.runtime.allocator.needs", "enclaver_rules.runtime.allocator.EIF_MEMORY_RATIO",
            }, f"{path.name} imports {name}"


# ---- the CLI on enclaves built here --------------------------------------------------------------

def built(where: Path, *, memory_mb: int = 1000, name: str = "web", padding: int = 0) -> Path:
    """An EIF built by `enclaver eif build` (dev blobs) whose enclave image, with its manifest, is in
    the store `where/cache`, as after a build; returns the EIF."""
    where.mkdir(parents=True, exist_ok=True)
    text = (f"version: v1\nname: {name}\ntarget: registry.example.com/web:release\nsources:\n  app: x:1\n"
            f"ingress:\n  - listen_port: 8080\n  - listen_port: 8443\ndefaults:\n  cpu_count: 2\n"
            f"  memory_mb: {memory_mb}\n")
    entries = [Entry.file("bin/app", b"app" + bytes(padding), 0o755), Entry.file("etc/enclaver/enclaver.yaml",
                                                                                 text.encode(), 0o644)]
    make_layout(str(where / "layout"), "v", [entries], cmd=("/bin/app",))
    write_dev_blobs(where / "blobs", "x86_64")
    from enclaver_rules.cli.main import main

    code = main(["eif", "build", "--image", f"oci:{where / 'layout'}:v", "--blobs", str(where / "blobs"), "-o",
                 str(where / "app.eif"), "--cache-dir", str(where / "cache"), "-q"], stdout=io.StringIO(),
                stderr=io.StringIO())
    assert code == 0
    return where / "app.eif"


@pytest.fixture(scope="module")
def eif(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return built(tmp_path_factory.mktemp("k8s"))


def measurements_of(cli: Callable[..., Any], eif: Path) -> dict[str, str]:
    described = cli("eif", "describe", str(eif), "--json")
    assert described.code == 0, described.stderr
    return {k: v for k, v in described.json()["Measurements"].items() if k.startswith("PCR")}


def test_cli_from_an_eif_uses_the_manifests_target_and_says_it_is_not_pinned(cli, eif: Path) -> None:
    result = cli("k8s", "manifest", str(eif), "--cache-dir", str(eif.parent / "cache"))
    assert result.code == 0, result.stderr
    [document] = list(yaml.safe_load_all(result.stdout))
    assert schema_errors(document) == [] and api_rules(document) == []
    assert container(document)["image"] == "registry.example.com/web:release"
    assert "not pinned by digest" in result.stderr and "--image" in result.stderr
    assert "500 2Mi huge pages" in result.stderr and result.stdout.startswith("# enclaver k8s manifest ")
    assert document["spec"]["template"]["metadata"]["annotations"]["dev.enclaver/pcr0"] == \
        measurements_of(cli, eif)["PCR0"]


def test_cli_from_a_build_directory_pins_the_release_image(cli, eif: Path, tmp_path: Path) -> None:
    latest = tmp_path / "out" / "web" / "latest"
    latest.mkdir(parents=True)
    shutil.copy(eif, latest / "application.eif")
    release = "sha256:" + "12" * 32
    (latest / "build.json").write_text(json.dumps({"target": "registry.example.com/web:release",
                                                   "release_image": release,
                                                   "measurements": measurements_of(cli, eif)}))
    result = cli("k8s", "manifest", str(latest), "--cache-dir", str(eif.parent / "cache"), "--json")
    assert result.code == 0, result.stderr
    doc = result.json()
    assert doc["image"] == f"registry.example.com/web@{release}" and doc["pinned"] is True
    assert "push it before applying" in doc["image_source"] and schema_errors(doc["deployment"]) == []
    assert doc["enclave"] == {"memory_mib": 1000, "eif_min_mib": doc["enclave"]["eif_min_mib"], "cpu_count": 2,
                              "hugepage_size": "2Mi", "pages": 500, "hugepages": "1000Mi"}
    (latest / "pushed.json").write_text(json.dumps({"target": "registry.example.com/web:release", "digest": release}))
    result = cli("k8s", "manifest", str(latest / "application.eif"), "--cache-dir", str(eif.parent / "cache"),
                 "--json")
    assert result.json()["image"] == f"registry.example.com/web@{release}" and "pushed" in result.json()["image_source"]
    # records of another EIF are not believed
    (latest / "build.json").write_text(json.dumps({"target": "registry.example.com/web:release",
                                                   "release_image": release, "measurements": {"PCR0": "00" * 48}}))
    result = cli("k8s", "manifest", str(latest), "--cache-dir", str(eif.parent / "cache"), "--json")
    assert result.json()["image"] == "registry.example.com/web:release" and result.json()["pinned"] is False


def test_cli_from_a_release_image_in_the_store_pins_its_digest(cli, eif: Path) -> None:
    from enclaver_rules.oci.mutate import ConfigEdit, edit_image, empty_image
    from enclaver_rules.oci.store import Store
    from enclaver_rules.rules.release import RELEASE_EIF

    store = Store(eif.parent / "cache")
    buffer = io.BytesIO()
    layer = write_layer([Entry.file(RELEASE_EIF, eif.read_bytes(), 0o644)], buffer)  # type: ignore[arg-type]
    store.put_bytes(buffer.getvalue(), layer.digest)
    base = empty_image("x86_64")
    released = edit_image(*base, layers=[layer], edit=ConfigEdit(labels=(("dev.enclaver.version", "test"),)))
    digest = store.keep_image("registry.example.com/web:release", released).digest
    result = cli("k8s", "manifest", "registry.example.com/web:release", "--cache-dir", str(eif.parent / "cache"),
                 "--namespace", "enclaves", "--replicas", "2", "--hugepage-size", "1Gi",
                 "--node-selector", "example.com/pool=nitro", "--node-selector", "zone=a", "-q")
    assert result.code == 0, result.stderr
    document = yaml.safe_load(result.stdout)
    assert container(document)["image"] == f"registry.example.com/web@{digest}"
    assert document["metadata"]["namespace"] == "enclaves" and document["spec"]["replicas"] == 2
    assert container(document)["resources"]["limits"]["hugepages-1Gi"] == "1Gi"
    assert document["spec"]["template"]["spec"]["nodeSelector"] == {"example.com/pool": "nitro", "zone": "a"}
    assert schema_errors(document, REQUIRED_RELEASES[0]) == [] and api_rules(document) == []
    assert result.stderr == ""  # -q: data only


def test_cli_writes_the_file_atomically_and_nothing_on_stdout(cli, eif: Path, tmp_path: Path) -> None:
    target = tmp_path / "deploy.yaml"
    target.write_text("old")
    result = cli("k8s", "manifest", str(eif), "--cache-dir", str(eif.parent / "cache"), "-o", str(target),
                 "--image", IMAGE)
    assert result.code == 0 and result.stdout == "" and f"wrote {target}" in result.stderr
    assert "not pinned" not in result.stderr and container(yaml.safe_load(target.read_text()))["image"] == IMAGE
    assert [p.name for p in tmp_path.iterdir()] == ["deploy.yaml"]  # no temp file left
    missing = cli("k8s", "manifest", str(eif), "--cache-dir", str(eif.parent / "cache"), "-o",
                  str(tmp_path / "no" / "such" / "dir.yaml"))
    assert missing.code == 1 and missing.stdout == "" and "cannot write it" in missing.stderr


@pytest.mark.parametrize("flags, field", [
    (["--replicas", "0"], "--replicas"), (["--replicas", "-1"], "--replicas"),
    (["--namespace", "Not_A_Label"], "--namespace"), (["--namespace", "x" * 64], "--namespace"),
    (["--node-selector", "novalue"], "--node-selector"), (["--node-selector", "k=v;rm -rf"], "--node-selector"),
    (["--node-selector", "a=b", "--node-selector", "a=c"], "--node-selector"),
    (["--name", "UPPER"], "--name"), (["--image", "not a reference"], "--image"),
    (["--image", "Registry.example.com/UPPER:1"], "--image"),
])
def test_cli_refuses_hostile_flags_before_reading_anything(cli, flags: list[str], field: str, tmp_path: Path) -> None:
    result = cli("k8s", "manifest", str(tmp_path / "missing.eif"), "--cache-dir", str(tmp_path), *flags)
    assert result.code == 2 and result.stdout == ""
    assert f"{field}:" in result.stderr and " — " in result.stderr and "missing.eif" not in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_refuses_a_manifest_kubernetes_cannot_run(cli, tmp_path: Path) -> None:
    small = built(tmp_path / "small", memory_mb=64, padding=17 * MiB)  # an EIF over 17 MiB: a floor of 72 MiB
    result = cli("k8s", "manifest", str(small), "--cache-dir", str(small.parent / "cache"))
    assert result.code == 2 and result.stdout == ""
    assert "defaults.memory_mb" in result.stderr and "set defaults.memory_mb: " in result.stderr
    odd = built(tmp_path / "odd", name="Web_1")
    result = cli("k8s", "manifest", str(odd), "--cache-dir", str(odd.parent / "cache"))
    assert result.code == 2 and "name: 'Web_1'" in result.stderr and "--name web-1" in result.stderr
    assert cli("k8s", "manifest", str(odd), "--cache-dir", str(odd.parent / "cache"), "--name", "web-1").code == 0


def test_cli_refuses_what_enclaver_did_not_build(cli, tmp_path: Path) -> None:
    (tmp_path / "x.eif").write_bytes(b"not an eif")
    result = cli("k8s", "manifest", str(tmp_path / "x.eif"), "--cache-dir", str(tmp_path))
    assert result.code in (1, 2) and result.stdout == "" and "Traceback" not in result.stderr
    result = cli("k8s", "manifest", "registry.example.com/nothing:here", "--cache-dir", str(tmp_path))
    assert result.code == 2 and "no such file, build directory or image" in result.stderr


def test_help_documents_the_exit_codes(cli, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("k8s", "manifest", "--help").code == 0
    text = capsys.readouterr().out  # argparse prints help itself
    assert "exit codes:" in text and "  2 " in text and "--json" in text
    assert "aws.ec2.nitro/nitro_enclaves" in text and "--node-selector" in text
