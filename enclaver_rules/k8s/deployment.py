"""A Kubernetes Deployment that runs an enclaver release image through the AWS Nitro Enclaves device plugin.

Pure: `deployment(manifest, eif_size, options)` returns the object as plain data, `render` turns
documents into YAML; nothing here reads a file, an image or a cluster (the CLI does, in
`enclaver_rules.cli.k8s`). The container is the release image with no command or arguments: its
entrypoint runs `enclaver run`, which starts the EIF with nitro-cli on the node and runs the host
side (ingress listeners, egress, logs) in the pod.

What is taken from where (read for this module; the code is ours):

* aws/aws-nitro-enclaves-k8s-device-plugin (v0.3, 2025-04): the plugin registers the extended
  resource `aws.ec2.nitro/nitro_enclaves` (`pkg/nitro_enclaves_device_plugin/device_plugin.go`,
  `ResourceName`), and its `Allocate` hands the container `/dev/nitro_enclaves` as a device (host
  path = container path, permissions `rw`), so the pod needs neither `privileged` nor a hostPath
  (upstream enclaver's old example had both). It advertises `MAX_ENCLAVES_PER_NODE` devices per
  node, at most and by default 4, AWS's limit of enclaves per instance (`pkg/config/config.go`).
  With `ENCLAVE_CPU_ADVERTISEMENT=true` (off by default, `helm/values.yaml`) a second plugin
  advertises one `aws.ec2.nitro/nitro_enclaves_cpus` per CPU the allocator took offline
  (`pkg/nitro_enclaves_cpu_plugin/device_plugin.go`). Its DaemonSet runs only on nodes labelled
  `aws-nitro-enclaves-k8s-dp: enabled` (`aws-nitro-enclaves-k8s-ds.yaml`, README: `kubectl label
  node NODE aws-nitro-enclaves-k8s-dp=enabled`): our default node selector.
* aws/aws-nitro-enclaves-with-k8s (AWS's EKS guide, `container/hello/hooks.sh` and
  `container/kms/hooks.sh` at d283a7e): the app Deployment puts `aws.ec2.nitro/nitro_enclaves: "1"`
  and `hugepages-2Mi` in both limits and requests, a CPU limit of 250m, and an `emptyDir` of
  `medium: HugePages-2Mi` mounted at `/hugepages-2Mi` (a 1Gi twin commented out); no
  securityContext. Its tolerations of every NoSchedule and NoExecute taint are a demo's and are
  not copied.
* Kubernetes, "Manage HugePages" (kubernetes.io, tasks/manage-hugepages): the resource is
  `hugepages-<size>`; requests must equal limits (the default when only limits are given); huge
  pages are never overcommitted; a container asking for them must ask for CPU or memory too; a
  volume of one page size is `medium: HugePages-<size>`; nodes report only pre-allocated pages,
  and pages allocated after boot only once the kubelet restarts.
* aws/aws-nitro-enclaves-cli 1.5.0: nitro-cli maps the enclave's memory as huge pages, the
  largest it can get first (`src/enclave_proc/resource_manager.rs`, `ResourceAllocator::allocate`),
  and the allocator reserves `memory_mib` the same way, largest page size first
  (`bootstrap/nitro-enclaves-allocator`, `set_required_hugepages`); the memory an enclave needs
  from its manifest and EIF (4 × the EIF's size at least) is `runtime.allocator.needs`, reused here.

Ours: the pod's own CPU and memory (the host side: Python, the proxies, nitro-cli), the labels and
annotations, and a rolling update that never surges (each replica holds huge pages and an enclave
slot that a node rarely has spare, so a surge pod would wait and stall the rollout).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from enclaver_rules.errors import Diagnostic, InvalidInput
from enclaver_rules.manifest.model import Manifest
from enclaver_rules.runtime.allocator import EIF_MEMORY_RATIO, needs

DEVICE_RESOURCE = "aws.ec2.nitro/nitro_enclaves"
CPU_RESOURCE = "aws.ec2.nitro/nitro_enclaves_cpus"
DEVICE_PATH = "/dev/nitro_enclaves"
PLUGIN_LABEL = "aws-nitro-enclaves-k8s-dp"
DEFAULT_NODE_SELECTOR: tuple[tuple[str, str], ...] = ((PLUGIN_LABEL, "enabled"),)
HUGEPAGE_SIZES = {"2Mi": 2, "1Gi": 1024}  # in MiB: sizes both x86_64 and Graviton (4K-granule) kernels offer
CONTAINER = "enclave"
#: The host side's own share of the node (not the enclave's: that is the huge pages and the
#: allocator's CPUs). The CPU request is AWS's example's 250m; no CPU limit, so the proxies are never
#: throttled; the memory limit bounds the host side only.
HOST_CPU_REQUEST = "250m"
HOST_MEMORY_REQUEST = "256Mi"
HOST_MEMORY_LIMIT = "512Mi"
ANNOTATION_PREFIX = "dev.enclaver/"
MAX_REPLICAS = 2**31 - 1  # DeploymentSpec.replicas is an int32

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_LABEL_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")  # also a label value, when not empty


@dataclass(frozen=True, slots=True)
class Options:
    """What the user chooses; `image` is the reference the pod pulls (digest-pinned where known)."""

    image: str
    name: str | None = None  # the Deployment's name; default: the manifest's
    namespace: str | None = None  # default: kubectl's current namespace
    replicas: int = 1
    hugepage_size: str = "2Mi"
    node_selector: tuple[tuple[str, str], ...] = DEFAULT_NODE_SELECTOR
    enclave_cpus: bool = False  # also request aws.ec2.nitro/nitro_enclaves_cpus (the CPU plugin must be on)

    def problems(self, manifest_name: str | None = None) -> list[Diagnostic]:
        """Everything wrong with the options, each naming its flag and a fix; `manifest_name` is
        checked when no --name replaces it."""
        found: list[Diagnostic] = []
        whole = isinstance(self.replicas, int) and not isinstance(self.replicas, bool)
        if not whole or not 1 <= self.replicas <= MAX_REPLICAS:
            found.append(Diagnostic(f"{self.replicas!r} replicas: give 1 or more (at most {MAX_REPLICAS})",
                                    field="--replicas",
                                    fix="scale an applied Deployment to nothing with `kubectl scale --replicas=0`"))
        if self.namespace is not None and not _is_dns_label(self.namespace):
            found.append(Diagnostic(f"{self.namespace!r} is not a namespace name (an RFC 1123 label: at most 63 "
                                    "lowercase letters, digits and '-', starting and ending with a letter or digit)",
                                    field="--namespace", fix="e.g. --namespace enclaves"))
        if self.hugepage_size not in HUGEPAGE_SIZES:
            found.append(Diagnostic(f"{self.hugepage_size!r} is not a huge page size enclaver knows",
                                    field="--hugepage-size", fix=f"use one of {', '.join(HUGEPAGE_SIZES)}"))
        name = self.name if self.name is not None else manifest_name
        if name is not None and not _is_dns_label(name):
            where = "--name" if self.name is not None else "name"
            found.append(Diagnostic(f"{name!r} cannot name a Deployment and its container (an RFC 1123 label: at "
                                    "most 63 lowercase letters, digits and '-', starting and ending with a letter "
                                    "or digit)", field=where,
                                    fix=f"pass --name {_suggest(name)}" if where == "name" else "e.g. --name web"))
        for key, value in self.node_selector:
            found += _label_problems(key, value)
        keys = [key for key, _ in self.node_selector]
        for key in sorted({k for k in keys if keys.count(k) > 1}):
            found.append(Diagnostic(f"{key!r} is selected on twice: a node has one value per label",
                                    field="--node-selector", fix=f"give {key}=VALUE once"))
        if not self.image or any(c.isspace() for c in self.image):
            found.append(Diagnostic(f"{self.image!r} is not an image reference", field="--image",
                                    fix="give the release image as REGISTRY/REPOSITORY@sha256:<64 hex>"))
        return found


@dataclass(frozen=True, slots=True)
class Sizing:
    """The enclave's memory as huge pages: `memory_mib` is what `enclaver run` starts it with
    (the manifest's `defaults`), rounded up to whole pages of `page_size`."""

    memory_mib: int
    eif_min_mib: int
    cpu_count: int
    page_size: str
    pages: int

    @property
    def resource(self) -> str:
        return f"hugepages-{self.page_size}"

    @property
    def hugepages_mib(self) -> int:
        return self.pages * HUGEPAGE_SIZES[self.page_size]

    @property
    def quantity(self) -> str:
        """In the page size's own unit, as Kubernetes prints it: `1024Mi` for 512 2Mi pages, `2Gi`."""
        unit = self.page_size[-2:]
        return f"{self.pages * int(self.page_size[:-2])}{unit}"


def sizing(manifest: Manifest, eif_size: int, page_size: str = "2Mi") -> Sizing:
    """The huge pages the pod must hold for this enclave (allocator.needs, rounded up to whole pages).
    InvalidInput when the manifest's memory is below nitro-cli's floor for the EIF: `enclaver run`
    with no arguments (the release image's entrypoint) could not start it."""
    if page_size not in HUGEPAGE_SIZES:
        raise InvalidInput(f"{page_size!r} is not a huge page size enclaver knows", field="--hugepage-size",
                           fix=f"use one of {', '.join(HUGEPAGE_SIZES)}")
    need = needs(manifest, eif_size)
    if need.memory_mib < need.eif_min_mib:
        raise InvalidInput(f"the enclave is given {need.memory_mib} MiB but its EIF needs at least {need.eif_min_mib} "
                           f"MiB ({EIF_MEMORY_RATIO} × its size, nitro-cli's rule), so the release image's "
                           "`enclaver run` could not start it", file=manifest.path, field="defaults.memory_mb",
                           fix=f"set defaults.memory_mb: {need.eif_min_mib} (or more) in enclaver.yaml and build again")
    page = HUGEPAGE_SIZES[page_size]
    return Sizing(need.memory_mib, need.eif_min_mib, need.cpu_count, page_size, -(-need.memory_mib // page))


def deployment(manifest: Manifest, eif_size: int, options: Options,
               measurements: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The apps/v1 Deployment; InvalidInput lists every problem with the options and the manifest."""
    problems = options.problems(manifest.name)
    if problems:
        raise InvalidInput(diagnostics=problems)
    size = sizing(manifest, eif_size, options.hugepage_size)
    name = options.name or manifest.name
    labels = {"app.kubernetes.io/name": name, "app.kubernetes.io/managed-by": "enclaver"}
    annotations = {
        f"{ANNOTATION_PREFIX}enclave": manifest.name,
        f"{ANNOTATION_PREFIX}enclave-memory-mib": str(size.memory_mib),
        f"{ANNOTATION_PREFIX}enclave-cpu-count": str(size.cpu_count),
        **{f"{ANNOTATION_PREFIX}{k.lower()}": v for k, v in sorted((measurements or {}).items())
           if re.fullmatch(r"PCR\d{1,2}", k)},
    }
    enclave = {DEVICE_RESOURCE: "1", size.resource: size.quantity,
               **({CPU_RESOURCE: str(size.cpu_count)} if options.enclave_cpus else {})}
    volume = f"hugepages-{options.hugepage_size.lower()}"
    container: dict[str, Any] = {"name": CONTAINER, "image": options.image}  # no command: the entrypoint's
    if manifest.ingress:
        container["ports"] = [{"name": f"ingress-{i.listen_port}", "containerPort": i.listen_port, "protocol": "TCP"}
                              for i in manifest.ingress]
    container["resources"] = {
        "requests": {"cpu": HOST_CPU_REQUEST, "memory": HOST_MEMORY_REQUEST, **enclave},
        "limits": {"memory": HOST_MEMORY_LIMIT, **enclave},
    }
    container["volumeMounts"] = [{"name": volume, "mountPath": f"/hugepages-{options.hugepage_size}"}]
    metadata: dict[str, Any] = {"name": name, **({"namespace": options.namespace} if options.namespace else {}),
                                "labels": labels}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata,
        "spec": {
            "replicas": options.replicas,
            "selector": {"matchLabels": {"app.kubernetes.io/name": name}},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}},
            "template": {
                "metadata": {"labels": dict(labels), "annotations": annotations},
                "spec": {
                    **({"nodeSelector": dict(options.node_selector)} if options.node_selector else {}),
                    "containers": [container],
                    "volumes": [{"name": volume, "emptyDir": {"medium": f"HugePages-{options.hugepage_size}"}}],
                },
            },
        },
    }


def parse_node_selector(text: str) -> tuple[str, str]:
    """`KEY=VALUE` (a Kubernetes label; the value may be empty) or InvalidInput naming --node-selector."""
    key, equals, value = text.partition("=")
    if not equals:
        raise InvalidInput(f"{text!r} is not KEY=VALUE", field="--node-selector",
                           fix=f"e.g. --node-selector {PLUGIN_LABEL}=enabled")
    problems = _label_problems(key, value)
    if problems:
        raise InvalidInput(diagnostics=problems)
    return key, value


def render(documents: Sequence[Mapping[str, Any]], comments: Sequence[str] = ()) -> str:
    """YAML, one document per object (`---` between them), the comments on top; key order kept."""
    head = "".join(f"# {line}\n" for line in comments)
    body = "---\n".join(yaml.dump(dict(d), Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=120)
                        for d in documents)
    return head + body


class _Dumper(yaml.SafeDumper):
    """Safe YAML that spells every value out: no `&id001` anchors where one dict appears twice."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _is_dns_label(text: str) -> bool:
    return len(text) <= 63 and _DNS_LABEL.fullmatch(text) is not None


def _suggest(name: str) -> str:
    """A DNS label close to `name` (lowercase, '-' for anything else), for a fix."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", name.lower()))[:63].strip("-") or "enclave"


def _label_problems(key: str, value: str) -> list[Diagnostic]:
    """Kubernetes' rules for a label (apimachinery's IsQualifiedName and IsValidLabelValue)."""
    found = []
    prefix, slash, name = key.rpartition("/")
    if not (_LABEL_NAME.fullmatch(name) and len(name) <= 63) or (slash and not (
            prefix and len(prefix) <= 253 and _DNS_SUBDOMAIN.fullmatch(prefix))):
        found.append(Diagnostic(f"{key!r} is not a label key ([PREFIX/]NAME: NAME at most 63 letters, digits, '-', "
                                "'_' and '.', starting and ending with a letter or digit; PREFIX a lowercase DNS "
                                "name)", field="--node-selector", fix=f"e.g. --node-selector {PLUGIN_LABEL}=enabled"))
    if value and not (len(value) <= 63 and _LABEL_NAME.fullmatch(value)):
        found.append(Diagnostic(f"{value!r} is not a label value (at most 63 letters, digits, '-', '_' and '.', "
                                "starting and ending with a letter or digit; or empty)", field="--node-selector",
                                fix=f"e.g. --node-selector {PLUGIN_LABEL}=enabled"))
    return found
