"""JSON schemas the structured-output tests run: nested objects, arrays, enums, bounded numbers,
optional fields, string patterns and formats. Each must give valid output on the tiny models."""

from __future__ import annotations

from typing import Any

_STR = {"type": "string"}
_INT = {"type": "integer"}

SCHEMAS: dict[str, dict[str, Any]] = {
    "flat": {
        "type": "object",
        "properties": {"name": _STR, "age": _INT},
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    "any_object": {"type": "object"},
    "enum": {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green", "blue"]}},
        "required": ["color"],
    },
    "bounded_int": {
        "type": "object",
        "properties": {"n": {"type": "integer", "minimum": 3, "maximum": 17}},
        "required": ["n"],
    },
    "bounded_number": {
        "type": "object",
        "properties": {"x": {"type": "number", "exclusiveMinimum": 0.5, "maximum": 2.25}},
        "required": ["x"],
    },
    "negative_int": {"type": "integer", "maximum": -10},
    "boolean_and_null": {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "nothing": {"type": "null"}},
        "required": ["ok", "nothing"],
    },
    "optional_fields": {
        "type": "object",
        "properties": {"id": _INT, "note": _STR, "score": {"type": "number"}},
        "required": ["id"],
        "additionalProperties": False,
    },
    "nullable": {
        "type": "object",
        "properties": {"nick": {"anyOf": [_STR, {"type": "null"}]}},
        "required": ["nick"],
        "additionalProperties": False,
    },
    "pattern": {
        "type": "object",
        "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}},
        "required": ["code"],
    },
    "pattern_word": {"type": "string", "pattern": "^[a-z]+( [a-z]+)*$"},
    "string_lengths": {"type": "string", "minLength": 3, "maxLength": 8},
    "array_of_ints": {"type": "array", "items": _INT, "minItems": 2, "maxItems": 5},
    "array_of_enums": {"type": "array", "items": {"enum": ["a", "bb", "ccc"]}, "minItems": 1},
    "array_of_objects": {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {"k": _STR, "v": {"type": "integer", "minimum": 0}},
            "required": ["k", "v"],
            "additionalProperties": False,
        },
        "minItems": 1,
        "maxItems": 3,
    },
    "nested": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {
                    "name": _STR,
                    "address": {
                        "type": "object",
                        "properties": {"city": _STR, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                        "required": ["city", "zip"],
                        "additionalProperties": False,
                    },
                },
                "required": ["name", "address"],
                "additionalProperties": False,
            }
        },
        "required": ["user"],
        "additionalProperties": False,
    },
    "refs": {
        "$defs": {"point": {"type": "object", "properties": {"x": _INT, "y": _INT}, "required": ["x", "y"]}},
        "type": "object",
        "properties": {"a": {"$ref": "#/$defs/point"}, "b": {"$ref": "#/$defs/point"}},
        "required": ["a", "b"],
    },
    "one_of": {
        "oneOf": [
            {
                "type": "object",
                "properties": {"kind": {"const": "circle"}, "r": {"type": "number"}},
                "required": ["kind", "r"],
            },
            {
                "type": "object",
                "properties": {"kind": {"const": "square"}, "side": _INT},
                "required": ["kind", "side"],
            },
        ]
    },
    "const_and_tuple": {
        "type": "object",
        "properties": {
            "version": {"const": 2},
            "pair": {"type": "array", "prefixItems": [_STR, _INT], "items": False, "minItems": 2},
        },
        "required": ["version", "pair"],
    },
    "date_format": {
        "type": "object",
        "properties": {"when": {"type": "string", "format": "date"}},
        "required": ["when"],
    },
    "matrix": {
        "type": "array",
        "items": {"type": "array", "items": {"type": "number"}, "maxItems": 3},
        "maxItems": 3,
    },
    "many_required": {
        "type": "object",
        "properties": {k: {"type": "integer", "minimum": 0, "maximum": 9} for k in "abcdefgh"},
        "required": list("abcdefgh"),
        "additionalProperties": False,
    },
}

INVALID: dict[str, tuple[dict[str, Any], str]] = {
    "unknown type": ({"type": "strin"}, "strin"),
    "bad pattern": ({"type": "string", "pattern": "[a-"}, "regex"),
    "dangling ref": ({"type": "object", "properties": {"a": {"$ref": "#/$defs/nope"}}}, "nope"),
    "unsatisfiable": ({"allOf": [{"type": "string"}, {"type": "integer"}]}, "nsatisfiable"),
    "bad keyword value": ({"type": "object", "minProperties": "x"}, "minProperties"),
}
