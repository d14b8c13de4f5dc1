"""PCR3 and PCR4 as AWS computes them, against the worked examples in the AWS Nitro Enclaves User
Guide ("Cryptographic attestation" → "Where to get an enclave's measurements": SHA-384 of 48 zero
bytes and the role ARN / instance id). Only the first and last hex digits are quoted here, as the
guide's examples were read (the middle is what our own computation must fill in consistently)."""

from __future__ import annotations

import pytest

from enclaver_rules.attestation import pcrs


@pytest.mark.parametrize(("value", "head", "tail"), [
    ("arn:aws:iam::123456789012:role/Webserver", "78fce75d", "2e6921e6"),  # PCR3, the guide's role example
    ("i-1234567890abcdef0", "08f996b5", "7ae79ce0"),  # PCR4, the guide's instance example
])
def test_pcr3_and_pcr4_match_the_aws_guides_examples(value: str, head: str, tail: str) -> None:
    digest = pcrs.of_string(value).hex()
    assert len(digest) == 96 and digest.startswith(head) and digest.endswith(tail)
