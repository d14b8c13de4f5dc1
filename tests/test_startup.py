"""Start-up cost, checked by structure rather than by the clock: what `enclaver` loads before it does
any work. Every start builds the whole parser (so `--help` and the README's command docs are
complete), and so imports every command module; those keep their heavy imports (rich, the registry
client, jsonschema, YAML, asyncio, cryptography, importlib.metadata) inside the functions that use
them. A module-level import of one of these, anywhere on that path, fails here — not as a slow run.
(issue 20: `enclaver --version` took ~0.3 s, of which ~0.2 s was imports it never used.)"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import enclaver_rules
import enclaver_rules.manifest

#: Nothing of these may load to parse a command line (or to print the version or a command's help).
HEAVY = ("jsonschema", "requests", "urllib3", "oras", "docker", "asyncio", "cryptography", "cbor2", "yaml", "rich",
         "doit", "importlib.metadata", "email", "tarfile", "hashlib",
         "enclaver_rules.oci.store", "enclaver_rules.oci.registry", "enclaver_rules.oci.resolve",
         "enclaver_rules.oci.flatten", "enclaver_rules.manifest.load", "enclaver_rules.manifest.validate",
         "enclaver_rules.manifest.model", "enclaver_rules.policy", "enclaver_rules.attestation",
         "enclaver_rules.cli.output", "enclaver_rules.cli.progress")


def _loaded(code: str, *, cwd: Path | None = None) -> dict[str, object]:
    """Run `code` in a fresh interpreter; it sets `result`; also: which of HEAVY it loaded."""
    script = textwrap.dedent(code) + textwrap.dedent(f"""
        import json, sys
        print(json.dumps({{"result": result, "heavy": sorted(m for m in {HEAVY!r} if m in sys.modules)}}))
        """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60,
                          cwd=cwd)
    loaded: dict[str, object] = json.loads(done.stdout.splitlines()[-1])
    return loaded


def test_importing_the_cli_loads_nothing_heavy() -> None:
    assert _loaded("import enclaver_rules.cli.main\nresult = None")["heavy"] == []


@pytest.mark.parametrize("argv", [["--version"], ["--help"], ["image", "push", "--help"], ["eif", "build", "--help"],
                                  ["config", "show", "--help"], ["run", "--help"]], ids=" ".join)
def test_parsing_a_command_line_loads_nothing_heavy(argv: list[str]) -> None:
    code = f"""
        import contextlib, io
        from enclaver_rules.cli.main import main
        with contextlib.redirect_stdout(io.StringIO()):
            result = main({argv!r})
        """
    assert _loaded(code) == {"result": 0, "heavy": []}


def test_the_flags_from_the_schema_need_no_validator() -> None:
    """`overridable_settings` reads the schema's JSON; jsonschema loads only to validate a manifest."""
    code = """
        from enclaver_rules.manifest.config import DEFAULT_MANIFEST, overridable_settings
        result = [DEFAULT_MANIFEST, len(overridable_settings())]
        """
    loaded = _loaded(code)
    assert loaded["heavy"] == [] and loaded["result"][0] == "enclaver.yaml" and loaded["result"][1] > 0


def test_the_manifest_package_still_offers_every_name() -> None:
    """Its names load with their submodule on first use (PEP 562): each is the submodule's own object."""
    from enclaver_rules.manifest import config, load, model

    for name in enclaver_rules.manifest.__all__:
        value = getattr(enclaver_rules.manifest, name)
        assert any(getattr(m, name, None) is value for m in (config, load, model)), name
    assert load.DEFAULT_MANIFEST == enclaver_rules.manifest.DEFAULT_MANIFEST == "enclaver.yaml"
    assert set(__import__("enclaver_rules.manifest", fromlist=["*"]).__all__) <= set(dir(enclaver_rules.manifest))
    with pytest.raises(AttributeError):
        enclaver_rules.manifest.no_such_name  # noqa: B018


@pytest.mark.parametrize("where", ["repo", "elsewhere"])
def test_the_version_is_what_importlib_metadata_says(where: str, tmp_path: Path) -> None:
    """Read without importlib.metadata where the installed metadata is plain (a dist-info, or the
    egg-info a checkout's `pip install -e` leaves beside the code); the same answer either way."""
    code = """
        import enclaver_rules
        fast = enclaver_rules.__version__
        from importlib.metadata import PackageNotFoundError, version
        try:
            slow = version("enclaver")
        except PackageNotFoundError:
            slow = "0+unknown"
        result = [fast, slow]
        """
    fast, slow = _loaded(code, cwd=Path(enclaver_rules.__file__).parent.parent if where == "repo" else tmp_path)["result"]
    assert fast == slow


def test_the_version_lookup_follows_importlib_metadata(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def dist(directory: Path, name: str, text: str, file: str = "METADATA") -> Path:
        (directory / name).mkdir(parents=True)
        (directory / name / file).write_text(text)
        return directory

    first = dist(tmp_path / "a", "enclaver-9.1.dist-info", "Metadata-Version: 2.1\nName: enclaver\nVersion: 9.1\n\nbody\nVersion: 0\n")
    second = dist(tmp_path / "b", "enclaver-9.2.dist-info", "Name: enclaver\nVersion: 9.2\n")
    egg = dist(tmp_path / "c", "Enclaver.egg-info", "Name: enclaver\nversion:  9.3\n", file="PKG-INFO")
    other = dist(tmp_path / "d", "enclaver_rules_extra-1.0.dist-info", "Name: enclaver-rules-extra\nVersion: 1.0\n")
    both = dist(dist(tmp_path / "e", "enclaver-1.dist-info", "Version: 1\n"), "enclaver.egg-info", "Version: 2\n", "PKG-INFO")
    for path, expected in (([str(other), str(tmp_path / "missing"), str(first), str(second)], "9.1"),
                           ([str(second), str(first)], "9.2"), ([str(egg), str(first)], "9.3"),
                           ([str(both), str(first)], None), ([str(tmp_path / "zip.zip"), str(first)], "9.1")):
        monkeypatch.setattr(sys, "path", path)
        assert enclaver_rules._path_version() == expected, path
    (tmp_path / "archive.zip").write_bytes(b"PK")  # a zip on the path: importlib.metadata reads those
    monkeypatch.setattr(sys, "path", [str(tmp_path / "archive.zip"), str(first)])
    assert enclaver_rules._path_version() is None
    monkeypatch.setattr(sys, "path", [str(other)])
    assert enclaver_rules._path_version() is None  # not found here: importlib.metadata decides
