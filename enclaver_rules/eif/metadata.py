"""The metadata section: nitro-cli's `EifIdentityInfo` JSON, written reproducibly.

Key order is fixed (ImageName, ImageVersion, BuildMetadata{BuildTime, BuildTool,
BuildToolVersion, OperatingSystem, KernelVersion}, DockerInfo, CustomMetadata); nested free-form
values have sorted keys; compact separators; non-ASCII raw — serde_json's output (eif.md §4).
Unlike nitro-cli, BuildTime comes from SOURCE_DATE_EPOCH and DockerInfo is null, so the EIF's
bytes, not only its PCRs, reproduce. Metadata is not measured.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Any


def _dump(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=True)


def kernel_info(config_text: str | None) -> tuple[str, str]:
    """(OperatingSystem, KernelVersion) from line 3 of the kernel config, as nitro-cli reads it."""
    if not config_text:
        return "Unknown", "Unknown"
    lines = config_text.splitlines()
    if len(lines) < 3:
        return "Unknown", "Unknown"
    words = [w for w in re.split(r"[ /-]", lines[2])]
    return (words[1] if len(words) > 1 else "Unknown", words[3] if len(words) > 3 else "Unknown")


def build_time(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S+00:00")


def metadata_json(*, image_name: str, image_version: str, epoch: int, tool: str, tool_version: str,
                  operating_system: str, kernel_version: str, docker_info: Any = None, custom: Any = None) -> bytes:
    build = ("{" + f'"BuildTime":{_dump(build_time(epoch))},"BuildTool":{_dump(tool)},'
             f'"BuildToolVersion":{_dump(tool_version)},"OperatingSystem":{_dump(operating_system)},'
             f'"KernelVersion":{_dump(kernel_version)}' + "}")
    text = ("{" + f'"ImageName":{_dump(image_name)},"ImageVersion":{_dump(image_version)},"BuildMetadata":{build},'
            f'"DockerInfo":{_dump(docker_info)},"CustomMetadata":{_dump(custom)}' + "}")
    return text.encode("utf-8")


# -- reading --------------------------------------------------------------------------------------

#: Nesting a metadata section may have (nitro-cli's is 2 deep; custom metadata a little more):
#: deeper JSON could not be printed back without recursing as deep.
MAX_DEPTH = 64


def _depth(value: Any) -> int:
    """How deeply `value` nests lists and objects, walked without recursion."""
    deepest, todo = 0, [(value, 0)]
    while todo:
        item, level = todo.pop()
        if isinstance(item, dict | list):
            level += 1
            deepest = max(deepest, level)
            if level > MAX_DEPTH:
                break
            todo.extend((child, level) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def read_metadata(data: bytes) -> dict[str, Any]:
    """The describe fields (ImageName, ImageVersion, Metadata) of a metadata section, as nitro-cli
    shows them; `ValueError` saying what is wrong when the section is not that JSON object."""
    try:
        info = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"byte {e.start} is not UTF-8") from None
    except RecursionError:
        raise ValueError(f"JSON nested more than {MAX_DEPTH} deep") from None
    except ValueError as e:  # JSONDecodeError, and integers too long to convert
        raise ValueError(f"not JSON: {e}") from None
    if not isinstance(info, dict):
        raise ValueError("not a JSON object")
    if _depth(info) > MAX_DEPTH:
        raise ValueError(f"JSON nested more than {MAX_DEPTH} deep")
    build = info.get("BuildMetadata")
    if build is not None and not isinstance(build, dict):
        raise ValueError("BuildMetadata is not an object")
    details = dict(build or {})
    details["DockerInfo"] = info.get("DockerInfo")
    if isinstance(info.get("CustomMetadata"), dict):
        details.update(info["CustomMetadata"])
    return {"ImageName": info.get("ImageName"), "ImageVersion": info.get("ImageVersion"),
            "Metadata": {k: v for k, v in details.items() if v is not None}}
