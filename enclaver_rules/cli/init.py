"""`enclaver init [DIR]`: make a repository (or one more directory of a monorepo) an enclaver project."""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shlex
import shutil
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from enclaver_rules.cli.exit_codes import ExitCode
from enclaver_rules.cli.options import Subparsers, add_json, epilog
from enclaver_rules.errors import Diagnostic, InvalidInput, OperationFailed

if TYPE_CHECKING:
    from enclaver_rules.cli.output import Output

CODES = {
    ExitCode.OK: "the files were written",
    ExitCode.FAILURE: "a file could not be written (what was written is removed again)",
    ExitCode.INVALID_INPUT: "a file is in the way (without --force), or DIR or --name is invalid; nothing was written",
}
DODO = "dodo.py"
MANIFEST = "enclaver.yaml"
GITIGNORE = ".gitignore"
CACHE = "cache"


def add_parser(commands: Subparsers[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    parser = commands.add_parser(
        "init", parents=[common], help="set up a directory: dodo.py, a sample enclaver.yaml, .gitignore lines",
        description="Make DIR an enclaver project: write a dodo.py that loads enclaver's rule set (so `doit list "
                    "--all` shows check:NAME, build:NAME, … for every enclaver.yaml below it), a sample "
                    "enclaver.yaml to edit (nothing in, nothing out), the cache/ directory, and the .gitignore "
                    "lines for cache/ and .venv/ that it lacks. Inside a project whose dodo.py loads the rule set "
                    "already (a monorepo), only the enclaver.yaml is written: that dodo.py finds it. An existing "
                    "enclaver.yaml, or a dodo.py of another kind, is never overwritten without --force; when one "
                    "is in the way nothing is written. Ends with the next steps.",
        epilog=epilog(CODES), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(func=run, exit_codes=CODES)
    parser.add_argument("dir", nargs="?", default=".", metavar="DIR",
                        help="the directory (default: the current one; created if missing)")
    parser.add_argument("--name", help="the enclave's name, unique in the project (default: DIR's name in lower "
                                       "case, reduced to letters, digits, '.', '_' and '-')")
    parser.add_argument("--force", action="store_true",
                        help="replace an existing enclaver.yaml, and a dodo.py that does not load enclaver's rules")
    add_json(parser)


# -- names -------------------------------------------------------------------------------------------


def _name_pattern() -> re.Pattern[str]:
    from enclaver_rules.manifest import schema

    return re.compile(schema.schema()["properties"]["name"]["pattern"])


def name_from(directory: str) -> str:
    """A directory's name as an enclave name: lower case (it also names images), every run of other
    characters one '-', no separator at either end, at most 128 characters; `enclave` if nothing is left."""
    name = re.sub(r"[^a-z0-9._-]+", "-", directory.lower()).strip("._-")[:128].strip("._-")
    return name or "enclave"


def repository_from(name: str) -> str:
    """The name as an image repository path component allows: lower case, one '-' between parts."""
    return re.sub(r"[._-]+", "-", name.lower()).strip("-") or "enclave"


# -- where the project is ----------------------------------------------------------------------------


def loads_rule_set(dodo: Path) -> bool:
    try:
        return "enclaver_rules" in dodo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False


def project_dodo(directory: Path) -> Path | None:
    """The dodo.py that loads enclaver's rules at or above `directory` (absolute), looking no higher
    than the repository's root (the first directory holding `.git`)."""
    for d in (directory, *directory.parents):
        if (d / DODO).is_file() and loads_rule_set(d / DODO):
            return d / DODO
        if (d / ".git").exists():
            return None
    return None


@dataclass
class Plan:
    """Everything init will do, decided before anything is written."""

    name: str
    directory: Path  # as given
    root: Path  # where dodo.py is (or will be): where doit runs
    files: dict[Path, str] = field(default_factory=dict)  # path → text, written (or replaced)
    kept: list[Path] = field(default_factory=list)
    gitignore: Path | None = None
    gitignore_lines: list[str] = field(default_factory=list)
    cache: Path | None = None
    warnings: list[str] = field(default_factory=list)


def missing_gitignore_lines(path: Path) -> list[str]:
    from enclaver_rules.cli.init_templates import GITIGNORE_COMMENT, GITIGNORE_ENTRIES

    present = set()
    if path.is_file():
        present = {line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines()}
    missing = [line for line, same in GITIGNORE_ENTRIES if not (same & present)]
    if missing and GITIGNORE_COMMENT not in present:
        missing.insert(0, GITIGNORE_COMMENT)
    return missing


def plan(directory_arg: str, name_arg: str | None, force: bool) -> Plan:
    from enclaver_rules.cli.init_templates import DODO as DODO_TEXT
    from enclaver_rules.cli.init_templates import manifest

    directory = Path(directory_arg)
    absolute = directory.resolve()
    if absolute.exists() and not absolute.is_dir():
        raise InvalidInput(f"{directory_arg}: not a directory", fix="give a directory (it is created if missing)")
    if name_arg is not None:
        if not _name_pattern().match(name_arg):
            raise InvalidInput(f"--name {name_arg!r}: not a valid enclave name", field="name",
                               fix="use letters, digits, '.', '_' and '-', starting with a letter or digit")
        name = name_arg
    else:
        name = name_from(absolute.name)

    found = project_dodo(absolute)
    root = found.parent if found else absolute
    result = Plan(name, directory, root)
    in_the_way: list[Diagnostic] = []

    manifest_path = directory / MANIFEST
    if os.path.lexists(manifest_path) and not force:
        in_the_way.append(Diagnostic(
            "exists; enclaver init does not overwrite it", file=str(manifest_path),
            fix="edit it, or pass --force to replace it with the sample"))
    result.files[manifest_path] = manifest(name, repository_from(name))

    if found is None or found.parent == absolute:
        dodo = directory / DODO
        if found is not None:
            result.kept.append(dodo)
        elif os.path.lexists(dodo) and not force:
            in_the_way.append(Diagnostic(
                "exists and does not load enclaver's rules; enclaver init does not overwrite it", file=str(dodo),
                fix="add `from enclaver_rules.rules import tasks` and "
                    "`globals().update(tasks(os.path.dirname(os.path.abspath(__file__))))` to it, "
                    "or pass --force to replace it"))
        else:
            result.files[dodo] = DODO_TEXT
        result.gitignore = directory / GITIGNORE
        result.gitignore_lines = missing_gitignore_lines(result.gitignore)
        if not (absolute / CACHE).is_dir():
            result.cache = directory / CACHE
    if in_the_way:
        raise InvalidInput(diagnostics=in_the_way)
    _check_name(result, absolute, manifest_path)
    return result


def _check_name(result: Plan, absolute: Path, manifest_path: Path) -> None:
    """The rule set must find the new manifest under its own name: refuse a name another manifest of
    the project has, warn when discovery skips the directory."""
    from enclaver_rules.rules.discover import SKIP_DIRS, discover

    if result.root != absolute:
        skipped = [p for p in absolute.relative_to(result.root).parts if p in SKIP_DIRS or p.startswith(".")]
        if skipped:
            result.warnings.append(
                f"doit will not find {manifest_path}: {result.root / DODO} skips directories named {skipped[0]} "
                f"(build it with `enclaver build -f {manifest_path}`, or choose another directory)")
    if not result.root.is_dir():
        return
    own = (absolute / MANIFEST).resolve()
    for enclave in discover(str(result.root)):
        path = (result.root / enclave.path).resolve()
        if enclave.name == result.name and path != own:
            raise InvalidInput(f"{os.path.relpath(path)} already names an enclave {result.name!r}", field="name",
                               fix="pass --name with another name (task names must be unique)")


# -- doing it ----------------------------------------------------------------------------------------


def apply(p: Plan) -> list[Path]:
    """Write the plan; on failure remove what this call created, so no half-made project is left."""
    from enclaver_rules.oci.store import atomic_write

    created: list[Path] = []
    try:
        missing = [d for d in (p.directory, *p.directory.parents) if not d.exists()]
        p.directory.mkdir(parents=True, exist_ok=True)
        created += reversed(missing)  # outermost first, so they are removed innermost first
        for path, text in p.files.items():
            new = not path.exists()
            atomic_write(path, text.encode())
            if new:
                created.append(path)
        if p.gitignore is not None and p.gitignore_lines:
            _append(p.gitignore, p.gitignore_lines, created)
        if p.cache is not None:
            p.cache.mkdir()
            created.append(p.cache)
    except OSError as e:
        for path in reversed(created):
            with contextlib.suppress(OSError):
                path.rmdir() if path.is_dir() else path.unlink()
        raise OperationFailed(f"{e.filename or p.directory}: {e.strerror or e}",
                              fix="nothing new was left behind; fix the cause and run again") from None
    return created


def _append(path: Path, lines: list[str], created: list[Path]) -> None:
    """Appended in place (not replaced), so a symlinked or hard-linked .gitignore keeps its link and mode."""
    if not path.exists():
        created.append(path)
        before = b""
    else:
        before = path.read_bytes()
    text = "".join(f"{line}\n" for line in lines)
    if before and not before.endswith(b"\n"):
        text = "\n" + text
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _shown(path: Path) -> str:
    """As the user would type it: relative to the current directory when below it."""
    rel = os.path.relpath(path.resolve())
    return str(path.resolve()) if rel.startswith("..") else rel


def next_steps(p: Plan) -> list[str]:
    here = Path.cwd().resolve()
    at_root = p.root.resolve() == here
    cd = "" if at_root else f"cd {shlex.quote(_shown(p.root))} && "
    below = "here" if at_root else _shown(p.root)
    return [
        f"edit {_shown(p.directory / MANIFEST)}: sources.app (your app image) and target (where to push)",
        f"{cd}doit list --all      # every task, for every enclaver.yaml below {below}",
        f"{cd}doit build:{p.name}",
        f"{cd}doit -n 4 build      # every enclave, four tasks at a time",
    ]


def _hints(p: Plan) -> list[str]:
    from enclaver_rules.eif.blobs import DEFAULT_BLOBS

    hints = []
    if shutil.which("doit") is None:  # installed with enclaver, but its directory is not on PATH
        scripts = [Path(sys.executable).parent, Path(sysconfig.get_path("scripts")),
                   Path(sysconfig.get_path("scripts", f"{os.name}_user"))]
        beside = next((d / "doit" for d in scripts if (d / "doit").is_file()), None)
        if beside is None:
            hints.append("doit is not on PATH: add the directory of the enclaver command to PATH")
        elif (beside.parent / "activate").is_file():
            hints.append(f"doit is not on PATH: run {beside}, or first `. {beside.parent / 'activate'}`")
        else:
            hints.append(f"doit is not on PATH: run {beside}, or add {beside.parent} to PATH")
    if not DEFAULT_BLOBS.is_dir():
        hints.append(f"no Nitro kernel blob set in {DEFAULT_BLOBS} (AWS's aws-nitro-enclaves-cli-devel installs "
                     f"it): to try the pipeline without it, see `build:` at the end of {MANIFEST}")
    return hints


def run(args: argparse.Namespace, out: Output) -> int:
    p = plan(args.dir, args.name, args.force)
    for warning in p.warnings:
        out.diagnostic(Diagnostic(warning, severity="warning"))
    apply(p)
    steps = next_steps(p)
    written = [_shown(path) for path in p.files]
    created = [_shown(p.cache) + "/"] if p.cache else []
    if args.json:
        out.json({
            "name": p.name, "project": _shown(p.root), "written": written, "kept": [_shown(k) for k in p.kept],
            "gitignore": {"path": _shown(p.gitignore), "added": p.gitignore_lines} if p.gitignore else None,
            "created": created, "next": steps})
    else:
        for shown in written:
            out.line(f"wrote {shown}")
        for kept in p.kept:
            out.line(f"kept {_shown(kept)} (it loads enclaver's rules already)")
        if p.root.resolve() != p.directory.resolve():
            out.line(f"using {_shown(p.root / DODO)}: it finds the new enclaver.yaml")
        if p.gitignore is not None and p.gitignore_lines:
            out.line(f"added to {_shown(p.gitignore)}: {' '.join(x for x in p.gitignore_lines if not x.startswith('#'))}")
        for shown in created:
            out.line(f"created {shown}")
    out.note("next:")
    for i, step in enumerate(steps, 1):
        out.note(f"  {i}. {step}")
    for hint in _hints(p):
        out.note(f"note: {hint}")
    return ExitCode.OK
