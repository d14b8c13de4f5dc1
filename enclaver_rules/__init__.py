"""enclaver: turn a container image into an AWS Nitro Enclave image, run it, and prove what runs.

Packages: `manifest` (enclaver.yaml), `policy` (egress rules), `rules` (doit tasks), `cli`.

`__version__` is looked up on first use (PEP 562 `__getattr__`), not at import: every `enclaver`
start imports this package, and `importlib.metadata` alone costs ~20 ms (email, zipfile, csv).
"""

from __future__ import annotations

DIST = "enclaver"
__version__: str  # set by __getattr__ on first use (or by a frozen binary's entry, which has no metadata)


def __getattr__(name: str) -> str:
    if name != "__version__":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = globals()["__version__"] = installed_version()
    return value


def installed_version() -> str:
    """What `importlib.metadata.version("enclaver")` says ("0+unknown" when not installed, as in a
    checkout that was not): read straight from the METADATA (or PKG-INFO) file of the first
    `enclaver-*.dist-info` or `enclaver.egg-info` directory on `sys.path`, as the standard path finder
    finds it; any other layout (an egg, a zip, two matches in one directory, another metadata finder)
    is left to importlib.metadata."""
    found = _path_version()
    if found is not None:
        return found
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(DIST)
    except PackageNotFoundError:  # running from a checkout that was not installed
        return "0+unknown"


def _path_version() -> str | None:
    import os
    import re
    import sys
    from importlib.machinery import PathFinder

    if any(f is not PathFinder and hasattr(f, "find_distributions") for f in sys.meta_path):
        return None
    for entry in sys.path:
        if not isinstance(entry, str) or entry.lower().endswith(".egg"):
            return None
        try:
            children = os.listdir(entry or ".")
        except Exception:  # noqa: BLE001 - as importlib.metadata: an unreadable entry holds nothing
            if os.path.isfile(entry):
                return None  # a zip file: importlib.metadata reads those
            continue
        # importlib.metadata's match: the name before the first "-", normalised, of *.dist-info / *.egg-info
        matches = [c for c in children if c.lower().endswith((".dist-info", ".egg-info")) and
                   re.sub(r"[-_.]+", "_", c.lower().rpartition(".")[0].partition("-")[0]) == DIST]
        if not matches:
            continue
        if len(matches) > 1:
            return None
        return _metadata_version(os.path.join(entry or ".", matches[0]))
    return None


def _metadata_version(info: str) -> str | None:
    """The Version header of METADATA (a .dist-info) or PKG-INFO (an .egg-info directory), read as
    importlib.metadata reads it (the first of the two files that has text); None if unsure."""
    import os

    for name in ("METADATA", "PKG-INFO"):
        try:
            with open(os.path.join(info, name), encoding="utf-8") as f:
                text = f.read()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError):
            continue
        except (OSError, UnicodeDecodeError):
            return None
        if not text:
            continue
        headers = text.split("\n\n", 1)[0].splitlines()
        for i, line in enumerate(headers):
            key, colon, value = line.partition(":")
            if colon and key.lower() == "version":
                folded = i + 1 < len(headers) and headers[i + 1][:1] in (" ", "\t")
                value = value.lstrip(" \t")  # as the email parser reads a header
                return None if folded or not value.strip() else value
        return None
    return None
