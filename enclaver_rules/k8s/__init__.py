"""Kubernetes: a Deployment that runs an enclaver release image on nodes with the AWS Nitro Enclaves
device plugin (`enclaver k8s manifest`). Pure: it builds documents from a manifest, the EIF's size
and options, and never reads a file or a cluster.
"""

from enclaver_rules.k8s.deployment import (
    CPU_RESOURCE,
    DEFAULT_NODE_SELECTOR,
    DEVICE_RESOURCE,
    HUGEPAGE_SIZES,
    Options,
    Sizing,
    deployment,
    parse_node_selector,
    render,
    sizing,
)

__all__ = ["CPU_RESOURCE", "DEFAULT_NODE_SELECTOR", "DEVICE_RESOURCE", "HUGEPAGE_SIZES", "Options", "Sizing",
           "deployment", "parse_node_selector", "render", "sizing"]
