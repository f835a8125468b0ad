"""A JSON Schema for experiment spec files, derived from the ExperimentSpec message itself.

Editors (VS Code's YAML extension, JetBrains) complete and check spec files with it; it follows
protobuf's JSON mapping, which is how spec files are read (field names in snake_case or
lowerCamelCase, enums by name, Durations as "0.5s"), plus the shorthands the reader accepts: a
network profile by its shipped name, and the original MECBench string NetEm config.
`scripts/genproto.py` writes it to `examples/experiment.schema.json`; a test keeps it fresh.
"""

from __future__ import annotations

import json
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor

from mecbench.profiles import PROFILES, STRING_FIELDS
from mecbench.v1 import controller_pb2

SCHEMA_FILE = "experiment.schema.json"

_DURATION = {"type": "string", "pattern": r"^-?[0-9]+(\.[0-9]{1,9})?s$", "description": "a duration, e.g. 0.5s"}
_WELL_KNOWN: dict[str, dict[str, Any]] = {
    "google.protobuf.Duration": _DURATION,
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    "google.protobuf.Struct": {"type": "object"},
    "google.protobuf.Value": {},
}
_INTEGER_64 = {"anyOf": [{"type": "integer"}, {"type": "string", "pattern": r"^-?[0-9]+$"}]}
_SCALARS: dict[int, dict[str, Any]] = {
    FieldDescriptor.TYPE_DOUBLE: {"type": "number"},
    FieldDescriptor.TYPE_FLOAT: {"type": "number"},
    FieldDescriptor.TYPE_INT32: {"type": "integer"},
    FieldDescriptor.TYPE_SINT32: {"type": "integer"},
    FieldDescriptor.TYPE_SFIXED32: {"type": "integer"},
    FieldDescriptor.TYPE_UINT32: {"type": "integer", "minimum": 0},
    FieldDescriptor.TYPE_FIXED32: {"type": "integer", "minimum": 0},
    FieldDescriptor.TYPE_INT64: _INTEGER_64,
    FieldDescriptor.TYPE_SINT64: _INTEGER_64,
    FieldDescriptor.TYPE_SFIXED64: _INTEGER_64,
    FieldDescriptor.TYPE_UINT64: _INTEGER_64,
    FieldDescriptor.TYPE_FIXED64: _INTEGER_64,
    FieldDescriptor.TYPE_BOOL: {"type": "boolean"},
    FieldDescriptor.TYPE_STRING: {"type": "string"},
    FieldDescriptor.TYPE_BYTES: {"type": "string", "contentEncoding": "base64"},
}


def _ref(descriptor: Descriptor) -> dict[str, Any]:
    return {"$ref": f"#/$defs/{descriptor.full_name}"}


def _value_schema(field: FieldDescriptor, defs: dict[str, Any]) -> dict[str, Any]:
    if field.enum_type is not None:
        names = [value.name for value in field.enum_type.values]
        return {"anyOf": [{"enum": names}, {"type": "integer"}]}
    if field.message_type is not None:
        message = field.message_type
        if message.full_name in _WELL_KNOWN:
            return dict(_WELL_KNOWN[message.full_name])
        _define(message, defs)
        return _ref(message)
    return dict(_SCALARS[field.type])


def _field_schema(field: FieldDescriptor, defs: dict[str, Any]) -> dict[str, Any]:
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        value_field = field.message_type.fields_by_name["value"]
        return {"type": "object", "additionalProperties": _value_schema(value_field, defs)}
    value = _value_schema(field, defs)
    if field.is_repeated:
        return {"type": "array", "items": value}
    return value


def _define(message: Descriptor, defs: dict[str, Any]) -> None:
    if message.full_name in defs:
        return
    defs[message.full_name] = {}  # placeholder: messages may refer to themselves
    properties: dict[str, Any] = {}
    for field in message.fields:
        schema = _field_schema(field, defs)
        properties[field.name] = schema
        if field.json_name != field.name:
            properties[field.json_name] = schema
    defs[message.full_name] = {"type": "object", "properties": properties, "additionalProperties": False}


def experiment_json_schema() -> dict[str, Any]:
    defs: dict[str, Any] = {}
    _define(controller_pb2.ExperimentSpec.DESCRIPTOR, defs)
    # The shorthands parse_experiment accepts.
    netem_strings = {
        "type": "object",
        "description": "the original MECBench NetEm config as strings, e.g. bandwidth: 10mbit, delay: 20ms",
        "properties": {key: {"type": ["string", "number"]} for key in STRING_FIELDS},
        "additionalProperties": False,
    }
    profile = defs["mecbench.v1.NetworkProfile"]
    for name in ("netem",):
        profile["properties"][name] = {"anyOf": [profile["properties"][name], netem_strings]}
    trace_text = {
        "type": "object",
        "description": "a trace's text: csv (header time,rate,delay,jitter,loss) or mahimahi (delivery times in ms)",
        "properties": {"csv": {"type": "string"}, "mahimahi": {"type": "string"}, "bin_ms": {"type": "integer"},
                       "source": {"type": "string"}},
        "additionalProperties": False,
    }
    profile["properties"]["schedule"] = {"anyOf": [profile["properties"]["schedule"], trace_text]}
    sweep = defs["mecbench.v1.Sweep"]
    by_name = {"type": "string", "description": "a shipped network profile", "enum": sorted(PROFILES)}
    for name in ("network_profiles", "networkProfiles"):
        items = sweep["properties"][name]["items"]
        sweep["properties"][name]["items"] = {"anyOf": [by_name, items]}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://mecbench.dev/schemas/v1/experiment.schema.json",
        "title": "MECBench experiment spec (mecbench.v1.ExperimentSpec)",
        "$ref": f"#/$defs/{controller_pb2.ExperimentSpec.DESCRIPTOR.full_name}",
        "$defs": dict(sorted(defs.items())),
    }


def experiment_json_schema_text() -> str:
    return json.dumps(experiment_json_schema(), indent=2) + "\n"
