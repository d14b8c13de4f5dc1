"""Pure policy logic: egress matching (`egress`) and KMS key policies (`kms`). No I/O in this package."""

from enclaver_rules.policy.egress import (
    Decision,
    Destination,
    EgressPolicy,
    Finding,
    IpRule,
    NameRule,
    PolicyError,
    Rule,
    parse_destination,
    parse_rule,
    review,
)

__all__ = [
    "Decision",
    "Destination",
    "EgressPolicy",
    "Finding",
    "IpRule",
    "NameRule",
    "PolicyError",
    "Rule",
    "parse_destination",
    "parse_rule",
    "review",
]
