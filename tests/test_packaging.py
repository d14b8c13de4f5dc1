"""An installed wheel carries the schema and works without a checkout."""

from __future__ import annotations

import os
import site
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

from conftest import REPO


def test_wheel_carries_the_schema_and_runs_outside_the_checkout(tmp_path: Path) -> None:
    built = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir",
                            str(tmp_path / "dist"), str(REPO)], check=True, capture_output=True, text=True, timeout=300)
    # setuptools warned on every install that the license table is deprecated (builds stop in 2027)
    assert "deprecated" not in (built.stdout + built.stderr).lower(), built.stdout + built.stderr
    [wheel] = (tmp_path / "dist").glob("enclaver-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "enclaver_rules/schemas/enclaver.schema.json" in names
    assert "enclaver_rules/py.typed" in names
    assert not any(n.startswith(("tests/", "examples/")) for n in names)
    packages = {str(p.parent.relative_to(REPO)).replace("/", ".") for p in (REPO / "enclaver_rules").rglob("__init__.py")}
    assert {p for p in packages if f"{p.replace('.', '/')}/__init__.py" not in names} == set()

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    # Dependencies come from the test environment through a plain path line: it is appended after the
    # new venv's own site-packages (so the wheel's copy wins), and .pth hooks there (the editable
    # install's finder) are not run.
    own_site = subprocess.run([python, "-c", "import site; print(site.getsitepackages()[0])"], capture_output=True,
                              text=True, check=True).stdout.strip()
    Path(own_site, "test-deps.pth").write_text(site.getsitepackages()[0] + "\n")
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True,
                   capture_output=True, timeout=300)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    result = subprocess.run([env_dir / "bin" / "enclaver", "manifest", "check", str(REPO / "examples/vault/enclaver.yaml")],
                            cwd=tmp_path, capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    where = subprocess.run([python, "-c", "import enclaver_rules; print(enclaver_rules.__file__)"], cwd=tmp_path,
                           capture_output=True, text=True, env=env).stdout
    assert str(env_dir) in where  # the installed copy, not the checkout
