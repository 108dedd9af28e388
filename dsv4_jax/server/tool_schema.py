"""How DSML parameter values are typed from a function's JSON schema.

DeepSeek-V4 writes each tool-call argument as ``string="true"`` (raw text, for a parameter
that is a string) or ``string="false"`` (JSON, for anything else). Both the parser
(``tool_parser``: which JSON a streamed value becomes) and the grammars (``tool_grammar``:
which form a constrained value may take) decide that from the parameter's schema the same
way, here: follow local ``$ref``s, read the JSON types it allows (``type``, else those of
its ``enum`` / ``const`` values), and call the parameter ``"string"``, ``"json"`` or
``"either"``. No other JSON-schema keyword matters for the choice.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

_JSON_TYPES = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: type(v) is int or (type(v) is float and v.is_integer()),
    "number": lambda v: type(v) in (int, float),
    "boolean": lambda v: type(v) is bool,
    "null": lambda v: v is None,
    "array": lambda v: type(v) is list,
    "object": lambda v: type(v) is dict,
}


def resolve_ref(schema: Any, root: dict) -> Any:
    """Follow local ``$ref``s (``#/$defs/X``, ``#/definitions/X``) against ``root``."""
    for _ in range(16):
        ref = schema.get("$ref") if isinstance(schema, dict) else None
        if not isinstance(ref, str) or not ref.startswith("#/"):
            break
        schema = root
        for part in ref[2:].split("/"):
            part = part.replace("~1", "/").replace("~0", "~")
            schema = schema.get(part, {}) if isinstance(schema, dict) else {}
    return schema


def schema_types(schema: Any) -> list[str] | None:
    """The JSON types a (resolved) schema allows, or None when it does not say."""
    if not isinstance(schema, dict):
        return None
    t = schema.get("type")
    if isinstance(t, str) or (isinstance(t, list) and all(isinstance(x, str) for x in t)):
        return [t] if isinstance(t, str) else list(t)
    values = [schema["const"]] if "const" in schema else schema.get("enum")
    if isinstance(values, list) and values:
        return sorted({next((n for n, ok in _JSON_TYPES.items() if ok(v)), "null") for v in values})
    return None


def value_kind(schema: Any, root: dict | None = None) -> str:
    """How a parameter is written: ``"string"`` (the schema allows only strings: raw text,
    ``string="true"``), ``"json"`` (no string: JSON, ``string="false"``) or ``"either"``."""
    types = schema_types(resolve_ref(schema, root or {}))
    if types is None or (types != ["string"] and "string" in types):
        return "either"
    return "string" if types == ["string"] else "json"


def fits_non_string(value: Any, types: Sequence[str] | None) -> bool:
    """Whether a decoded JSON ``value`` has one of ``types`` other than string (None or
    empty: any non-string type), i.e. whether a non-string parameter sent as raw text
    (``"5"`` for an integer) is taken as JSON. Unknown type names never match."""
    types = types or [t for t in _JSON_TYPES if t != "string"]
    return any(_JSON_TYPES.get(t, lambda _: False)(value) for t in types if t != "string")
