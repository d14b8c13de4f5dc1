"""Request and answer shapes from botocore's KMS model, so no member, limit or enum is written by hand.

`parse_input` walks an operation's input shape (`botocore/data/kms/2014-11-01/service-2.json`, shipped
with botocore) over the decoded JSON body: a value of the wrong JSON type, or a blob that is not
base64, is a SerializationException naming the member; a missing required member, a length, range,
enum or pattern outside the model's is a ValidationException in AWS's wording ("1 validation error
detected: Value … at 'numberOfBytes' failed to satisfy constraint: …"), every violation at once.
Blobs come out as bytes. Members the model does not know are ignored, as AWS's JSON protocol does
(UNCONFIRMED for KMS). `serialize_output` turns an answer back into JSON values by the output shape
(blobs → base64, timestamps → epoch seconds) and refuses a member the model lacks (a bug here).
"""

from __future__ import annotations

import base64
import binascii
import re
from functools import cache
from typing import Any

import botocore.session
from botocore.model import ListShape, MapShape, NoShapeFoundError, OperationModel, ServiceModel, Shape, StructureShape

from enclaver_rules.kms.wire import ServiceError


@cache
def model() -> ServiceModel:
    return botocore.session.get_session().get_service_model("kms")


@cache
def operation(name: str) -> OperationModel:
    return model().operation_model(name)


def operations() -> list[str]:
    return list(model().operation_names)


def error_status(code: str) -> int:
    """The HTTP status the model gives error `code` (400 when it gives none)."""
    try:
        shape = model().shape_for(code)
    except NoShapeFoundError:  # AccessDeniedException and the auth errors are not in the model
        return 400
    status = shape.metadata.get("error", {}).get("httpStatusCode", 400)
    return int(status)


def _camel(name: str) -> str:
    return name[:1].lower() + name[1:]


def _show(value: Any, shape: Shape) -> str:
    if shape.metadata.get("sensitive") or shape.type_name == "blob":
        return ""
    return f"'{value}' " if isinstance(value, str | int) and len(str(value)) <= 256 else ""


@cache
def _pattern(text: str) -> re.Pattern[str] | None:
    try:
        return re.compile(text)
    except re.error:  # a Java-only construct: not checked
        return None


class _Walk:
    def __init__(self) -> None:
        self.violations: list[str] = []

    def value(self, value: Any, shape: Shape, where: str) -> Any:
        kind = shape.type_name
        if kind == "structure":
            assert isinstance(shape, StructureShape)
            return self.structure(value, shape, where)
        if kind == "list":
            assert isinstance(shape, ListShape)
            if not isinstance(value, list):
                raise _type(where, "a list", value)
            self.length(len(value), shape, where, "length")
            return [self.value(v, shape.member, f"{where}.member") for v in value]
        if kind == "map":
            assert isinstance(shape, MapShape)
            if not isinstance(value, dict):
                raise _type(where, "an object", value)
            self.length(len(value), shape, where, "length")
            return {self.value(k, shape.key, f"{where}.key"): self.value(v, shape.value, f"{where}.value")
                    for k, v in value.items()}
        if kind == "string":
            if not isinstance(value, str):
                raise _type(where, "a string", value)
            self.length(len(value), shape, where, "length", value)
            enum = shape.enum
            if enum and value not in enum:
                self.violations.append(f"Value {_show(value, shape)}at '{where}' failed to satisfy constraint: "
                                       f"Member must satisfy enum value set: [{', '.join(enum)}]")
            pattern = shape.metadata.get("pattern")
            compiled = _pattern(pattern) if pattern else None
            if compiled is not None and not compiled.fullmatch(value):
                self.violations.append(f"Value {_show(value, shape)}at '{where}' failed to satisfy constraint: "
                                       f"Member must satisfy regular expression pattern: {pattern}")
            return value
        if kind == "blob":
            if not isinstance(value, str):
                raise _type(where, "a base64 string", value)
            try:
                raw = base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                raise ServiceError("SerializationException", f"'{where}' is not valid base64") from None
            self.length(len(raw), shape, where, "length")
            return raw
        if kind in ("integer", "long"):
            if not isinstance(value, int) or isinstance(value, bool):
                raise _type(where, "an integer", value)
            self.length(value, shape, where, "value", value)
            return value
        if kind == "boolean":
            if not isinstance(value, bool):
                raise _type(where, "a boolean", value)
            return value
        if kind == "timestamp":
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise _type(where, "a number of seconds", value)
            return value
        raise ServiceError("SerializationException", f"'{where}': values of type {kind} are not accepted")

    def structure(self, value: Any, shape: StructureShape, where: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise _type(where or "the body", "an object", value)
        out: dict[str, Any] = {}
        for name in shape.required_members:
            if value.get(name) is None:
                self.violations.append(f"Value null at '{_join(where, name)}' failed to satisfy constraint: "
                                       f"Member must not be null")
        for name, member in shape.members.items():
            if name in value and value[name] is not None:
                out[name] = self.value(value[name], member, _join(where, name))
        return out

    def length(self, size: int, shape: Shape, where: str, what: str, value: Any = None) -> None:
        low, high = shape.metadata.get("min"), shape.metadata.get("max")
        shown = _show(value, shape) if value is not None else ""
        if low is not None and size < low:
            self.violations.append(f"Value {shown}at '{where}' failed to satisfy constraint: Member must have "
                                   f"{what} greater than or equal to {low}")
        if high is not None and size > high:
            self.violations.append(f"Value {shown}at '{where}' failed to satisfy constraint: Member must have "
                                   f"{what} less than or equal to {high}")


def _join(where: str, name: str) -> str:
    return f"{where}.{_camel(name)}" if where else _camel(name)


def _type(where: str, wanted: str, value: Any) -> ServiceError:
    got = "null" if value is None else type(value).__name__.replace("dict", "object").replace("str", "string")
    return ServiceError("SerializationException", f"'{where}' must be {wanted}, not {got}")


def parse_input(action: str, body: Any) -> dict[str, Any]:
    """The request's members by the model (blobs decoded), or ServiceError naming every violation."""
    walk = _Walk()
    params = walk.structure(body, operation(action).input_shape, "")
    if walk.violations:
        count = len(walk.violations)
        raise ServiceError("ValidationException", f"{count} validation error{'s' if count > 1 else ''} detected: "
                                                  + "; ".join(walk.violations))
    return params


def serialize_output(action: str, result: dict[str, Any]) -> dict[str, Any]:
    shape = operation(action).output_shape
    return _out(result, shape) if shape is not None else {}


def _out(value: Any, shape: Shape) -> Any:
    kind = shape.type_name
    if kind == "structure":
        assert isinstance(shape, StructureShape)
        unknown = set(value) - set(shape.members)
        if unknown:
            raise KeyError(f"{shape.name} has no member {sorted(unknown)}")
        return {k: _out(v, shape.members[k]) for k, v in value.items() if v is not None}
    if kind == "list":
        assert isinstance(shape, ListShape)
        return [_out(v, shape.member) for v in value]
    if kind == "map":
        assert isinstance(shape, MapShape)
        return {k: _out(v, shape.value) for k, v in value.items()}
    if kind == "blob":
        return base64.b64encode(value).decode()
    if kind == "timestamp":
        return float(value)
    return value
