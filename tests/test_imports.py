"""The import rule: pure packages (and odyn) import only the stdlib, allow-listed libraries and other
pure modules — never adapters (docker, oras, boto3) or the CLI — and nothing in `enclaver_rules` imports
`odyn` (the host never reaches into the enclave's package; what both speak is `enclaver_rules.link`).
Checked on the source's AST."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from conftest import REPO

#: The KMS modules odyn's static binary stages (kms-recipient notes §2: CMS and the wire shapes shared by
#: the proxy and the local KMS); the rest of `enclaver_rules/kms` (server, key store, SigV4) are adapters.
KMS_PURE = ["enclaver_rules/kms/__init__.py", "enclaver_rules/kms/cms.py", "enclaver_rules/kms/wire.py",
            "enclaver_rules/kms/credentials.py"]  # the IMDSv2 client odyn's KMS proxy signs with (stdlib only)
PURE = ["enclaver_rules/policy", "enclaver_rules/manifest", "enclaver_rules/attestation", "enclaver_rules/errors.py", "enclaver_rules/ports.py",
        "enclaver_rules/redact.py", "enclaver_rules/link", "odyn", *KMS_PURE,
        *(f"enclaver_rules/oci/{m}.py" for m in ("digest", "reference", "mediatypes", "model", "layer", "mutate",
                                                  "flatten", "store"))]
#: Third-party clients, each allowed in exactly one adapter module.
ADAPTERS = {"docker": {"enclaver_rules/oci/engine.py", "enclaver_rules/eif/nitro_cli.py"},
            "oras": {"enclaver_rules/oci/registry.py"}, "requests": {"enclaver_rules/oci/registry.py"},
            "urllib3": {"enclaver_rules/oci/registry.py"}}
ALLOWED_THIRD_PARTY = {"yaml", "jsonschema", "cbor2"}  # cbor2: NSM messages, attestation
#: Third-party libraries allowed in some pure modules only: cryptography (no I/O, but big and native) is
#: for the attestation package, which verifies signatures and certificates; odyn's binary does without it.
#: odyn's KMS proxy (one module) makes its RSA key (cryptography), signs with botocore's SigV4 (`auth` and
#: `awsrequest` only: the binary's hook leaves botocore's service models out) and trusts certifi's CA bundle.
ALLOWED_UNDER = {"cryptography": ("enclaver_rules/attestation/", "enclaver_rules/kms/cms.py", "odyn/kms_proxy.py"),
                 "asn1crypto": ("enclaver_rules/kms/cms.py",),  # BER CMS, which cryptography cannot read
                 "botocore": ("odyn/kms_proxy.py",), "certifi": ("odyn/kms_proxy.py",)}
#: Of botocore, odyn may import only these (checked below): what else it imports may not be in the binary.
ODYN_BOTOCORE = {"botocore.auth.SigV4Auth", "botocore.awsrequest.AWSRequest"}
PURE_PREFIXES = ("odyn.", "enclaver_rules.policy", "enclaver_rules.manifest", "enclaver_rules.attestation",
                 "enclaver_rules.errors", "enclaver_rules.kms.cms", "enclaver_rules.kms.wire",
                 "enclaver_rules.kms.credentials",
                 "enclaver_rules.ports", "enclaver_rules.redact", "enclaver_rules.link",
                 *(f"enclaver_rules.oci.{m}" for m in ("digest", "reference", "mediatypes", "model", "layer", "mutate",
                                                        "flatten", "store")))


def _modules(entry: str) -> list[Path]:
    path = REPO / entry
    return sorted(path.rglob("*.py")) if path.is_dir() else [path]


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found |= {f"{node.module}.{a.name}" for a in node.names}  # what is bound: a module or a member
    return found


@pytest.mark.parametrize("path", [p for e in PURE for p in _modules(e)], ids=lambda p: str(p.relative_to(REPO)))
def test_pure_modules_import_only_pure_things(path: Path) -> None:
    for name in _imports(path):
        assert _allowed(str(path.relative_to(REPO)), name), f"{path.name} imports {name}"


def _allowed(rel: str, name: str) -> bool:
    """May the pure module at `rel` (relative to the repository) import `name`?"""
    top = name.split(".")[0]
    if top in sys.stdlib_module_names or top in ("__future__", "_typeshed") or top in ALLOWED_THIRD_PARTY:
        return True
    if rel.startswith(ALLOWED_UNDER.get(top, ())):
        return True
    return name.startswith(PURE_PREFIXES) or name == "enclaver_rules"


def test_the_rule_can_fail(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import docker\nfrom enclaver_rules.cli import main\n")
    assert _imports(bad) == {"docker", "enclaver_rules.cli.main"}


def _into_odyn(path: Path) -> set[str]:
    """What of `odyn` the module at `path` imports (`import odyn.x`, `from odyn.x import y`, `from odyn import x`)."""
    return {name for name in _imports(path) if name.split(".")[0] == "odyn"}


def test_nothing_in_enclaver_rules_imports_odyn() -> None:
    """odyn is the enclave's package; the host side (`runtime`), the rule set and the CLI speak to it
    through `enclaver_rules.link` and never import it, so what runs inside stays odyn's alone."""
    for path in sorted((REPO / "enclaver_rules").rglob("*.py")):
        taken = _into_odyn(path)
        assert not taken, f"{path.relative_to(REPO)} imports {sorted(taken)}; move what both sides speak to link"


def test_the_odyn_rule_can_fail(tmp_path: Path) -> None:
    bad = tmp_path / "egress_host.py"
    bad.write_text("import odyn.relay\nfrom odyn.transport import Transport\nfrom odyn import status\n"
                   "from enclaver_rules.link.frames import FrameDecoder\nimport odyntool\n")
    assert _into_odyn(bad) == {"odyn.relay", "odyn.transport.Transport", "odyn.status"}


def test_cryptography_is_allowed_in_attestation_only() -> None:
    assert _allowed("enclaver_rules/attestation/cose.py", "cryptography.x509")
    assert not _allowed("enclaver_rules/policy/kms.py", "cryptography.x509")
    assert not _allowed("odyn/nsm.py", "cryptography")
    assert not _allowed("enclaver_rules/attestation/verify.py", "docker")
    assert _allowed("odyn/nsm.py", "enclaver_rules.attestation.nsm_messages")
    assert _allowed("enclaver_rules/kms/cms.py", "asn1crypto.cms")
    assert not _allowed("enclaver_rules/kms/wire.py", "asn1crypto.cms")
    assert not _allowed("enclaver_rules/kms/cms.py", "botocore.auth")
    assert not _allowed("odyn/kms_proxy.py", "enclaver_rules.kms.server")


def test_odyn_takes_only_the_signer_from_botocore_and_only_in_the_kms_proxy() -> None:
    assert _allowed("odyn/kms_proxy.py", "botocore.auth.SigV4Auth")
    assert not _allowed("odyn/api.py", "botocore.auth.SigV4Auth")
    assert not _allowed("odyn/kms_rewrite.py", "cryptography.hazmat.primitives.asymmetric.rsa")
    for path in sorted((REPO / "odyn").rglob("*.py")):
        taken = {name for name in _imports(path) if name.split(".")[0] == "botocore"}
        assert taken <= ODYN_BOTOCORE, f"{path.name} imports {sorted(taken - ODYN_BOTOCORE)}"


def test_odyn_without_a_kms_proxy_loads_neither_botocore_nor_cryptography() -> None:
    """odyn imports the KMS proxy only when the manifest asks for it: every other enclave starts
    without paying for botocore and cryptography."""
    import subprocess

    code = ("import sys, odyn.__main__, odyn.supervisor, odyn.api; "
            "print(sorted(m for m in ('botocore', 'cryptography', 'certifi') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_the_shared_kms_modules_load_no_aws_sdk() -> None:
    """odyn's binary stages kms/__init__.py, cms.py and wire.py: none may pull boto3, botocore or moto in."""
    import subprocess

    code = ("import sys, enclaver_rules.kms.cms, enclaver_rules.kms.wire; "
            "print(sorted(m for m in ('boto3', 'botocore', 'moto') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_importing_the_attestation_package_loads_no_cryptography() -> None:
    """odyn's binary has no cryptography and imports `enclaver_rules.attestation.nsm_messages`:
    the package itself must not pull cryptography in."""
    import subprocess

    code = "import sys, enclaver_rules.attestation; print('cryptography' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_clients_stay_in_their_adapters() -> None:
    for path in sorted((REPO / "enclaver_rules").rglob("*.py")):
        rel = str(path.relative_to(REPO))
        for name in _imports(path):
            top = name.split(".")[0]
            if top in ADAPTERS:
                assert rel in ADAPTERS[top], f"{rel} imports {name}; only {sorted(ADAPTERS[top])} may"


def test_loading_the_rule_set_imports_no_registry_client() -> None:
    """doit imports the rule set on every run, a no-op one too: the registry client (requests,
    oras; ~70 ms) and the engine client load only when a step needs them."""
    import subprocess

    code = "import sys, enclaver_rules.rules; print(sorted(m for m in ('requests', 'oras', 'docker', 'boto3') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def _cose_and_cbor_uses(tree: ast.AST) -> tuple[set[str], set[str], bool]:
    """(cbor2 decoders used, signature conversions imported or used, whether "Signature1" is written)."""
    decoders, conversions, signature1 = {"loads", "load", "CBORDecoder"}, set(), False
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "cbor2":
            found |= {node.attr} & decoders
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cbor2"):
            found |= {a.name for a in node.names} & decoders
        if isinstance(node, ast.ImportFrom | ast.Name | ast.Attribute):
            used = {a.name for a in node.names} if isinstance(node, ast.ImportFrom) else \
                {node.id} if isinstance(node, ast.Name) else {node.attr}
            conversions |= used & {"decode_dss_signature", "encode_dss_signature"}
        signature1 |= isinstance(node, ast.Constant) and node.value == "Signature1"
    return found, conversions, signature1


def test_one_cose_and_one_cbor_reader() -> None:
    """COSE_Sign1 (the Sig_structure, raw ``r ‖ s`` conversions) lives in `attestation/cose.py` only, and
    hostile CBOR is read by `attestation/cbor_strict.py` only: cbor2, which turns tags into objects,
    only encodes. A second copy of either is a defect (../shared/design.md)."""
    for path in sorted([*(REPO / "enclaver_rules").rglob("*.py"), *(REPO / "odyn").rglob("*.py")]):
        rel = str(path.relative_to(REPO))
        decoders, conversions, signature1 = _cose_and_cbor_uses(ast.parse(path.read_text()))
        assert not decoders, f"{rel} decodes with cbor2 ({sorted(decoders)}); read CBOR with attestation.cbor_strict"
        if rel != "enclaver_rules/attestation/cose.py":
            assert not conversions and not signature1, f"{rel} has COSE_Sign1 code of its own; use attestation.cose"


def test_the_cose_rule_can_fail() -> None:
    old = ("import cbor2\nfrom cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature\n"
           "def s(p, q):\n    return cbor2.dumps(['Signature1', p, b'', q])\nx = cbor2.loads(b'')\n")
    assert _cose_and_cbor_uses(ast.parse(old)) == ({"loads"}, {"decode_dss_signature"}, True)
    assert _cose_and_cbor_uses(ast.parse("from cbor2 import CBORDecoder\nimport json\njson.load\n"))[0] == \
        {"CBORDecoder"}


#: Modules `enclaver run` reaches only on --simulate (and rich's Output, a type hint there): the runtime
#: image's binary has no Docker client, rich or simulator, and its parser has no --simulate.
RUNTIME_LEFT_OUT = {"enclaver_rules.oci.engine", "enclaver_rules.runtime.simulator", "enclaver_rules.runtime.sim_nsm",
                    "enclaver_rules.cli.output"}


def _closure(start: str, left_out: set[str]) -> tuple[set[str], set[str], set[str]]:
    """(enclaver_rules modules reached from `start` by any import, even inside a function; third-party
    top-level names they import; the left-out modules that were referenced)."""
    seen: set[str] = set()
    third: set[str] = set()
    skipped: set[str] = set()

    def source(name: str) -> Path | None:
        for candidate in (REPO / (name.replace(".", "/") + ".py"), REPO / name.replace(".", "/") / "__init__.py"):
            if candidate.is_file():
                return candidate
        return None

    def visit(name: str) -> None:
        if name in left_out:
            skipped.add(name)
            return
        path = source(name)
        if name in seen or path is None:
            return
        seen.add(name)
        parts = name.split(".")
        for i in range(1, len(parts)):
            visit(".".join(parts[:i]))
        for imported in _imports(path):
            if imported.startswith("enclaver_rules"):
                visit(imported)
                visit(imported.rsplit(".", 1)[0])  # `from pkg import member`: the package itself
            else:
                third.add(imported.split(".")[0])

    visit(start)
    return seen, third, skipped


def test_the_runtime_binary_stages_everything_the_host_side_imports() -> None:
    from enclaver_rules.odyn_image.build import source_files
    from enclaver_rules.odyn_image.runtime_image import RECIPE

    staged = {str(p.relative_to(REPO).with_suffix("")).replace("/", ".").removesuffix(".__init__")
              for p in source_files(RECIPE) if p.suffix == ".py"}
    reached, third, skipped = _closure("enclaver_rules.runtime.main", RUNTIME_LEFT_OUT)
    assert reached - staged == set(), "imported by the host side but not staged into enclaver-run"
    assert skipped == RUNTIME_LEFT_OUT  # the simulator's modules are referenced, and are left out on purpose
    assert third - set(sys.stdlib_module_names) - {"__future__"} == {"yaml", "jsonschema", "cbor2", "cryptography"}
