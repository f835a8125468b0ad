"""Experiment spec files: YAML or JSON, as users write them, into an ExperimentSpec.

Shared by the controller, the SDK and the CLI, so a file is read the same way wherever it is
read; the controller validates the resulting spec as a whole.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from google.protobuf import json_format

from mecbench.core.errors import InvalidArgument
from mecbench.profiles import STRING_FIELDS, netem_from_strings, schedule_from_csv, schedule_from_mahimahi
from mecbench.v1 import controller_pb2

__all__ = ["load_experiment_file", "parse_experiment"]


def _schedule(profile: dict[str, Any], field: str) -> dict[str, Any]:
    """A profile's `schedule` given as a trace's text: `{csv: ...}` (see schedule_from_csv) or
    `{mahimahi: ..., bin_ms: 100}` (a Mahimahi packet-delivery trace)."""
    schedule = profile.get("schedule")
    if not isinstance(schedule, dict) or not ({"csv", "mahimahi"} & set(schedule)):
        return profile
    source = str(schedule.get("source", ""))
    if "csv" in schedule:
        parsed = schedule_from_csv(str(schedule["csv"]), source or "inline csv", f"{field}.schedule.csv")
    else:
        bin_ms = int(schedule.get("bin_ms", 100))
        parsed = schedule_from_mahimahi(str(schedule["mahimahi"]), bin_ms, source or "inline mahimahi",
                                        f"{field}.schedule.mahimahi")
    return {**profile, "schedule": json_format.MessageToDict(parsed, preserving_proto_field_name=True)}


def _normalise(document: dict[str, Any]) -> dict[str, Any]:
    """Accept the shorthands people write: profile names as strings, the original MECBench
    string NetEm config (`bandwidth: 100mbit`, `delay: 20ms`) inside a profile, and a profile's
    schedule as a trace's text (`schedule: {csv: ...}` or `{mahimahi: ...}`)."""
    sweep = document.get("sweep") or {}
    mixes = sweep.get("client_mixes") or sweep.get("clientMixes")
    if isinstance(mixes, list):
        for m, mix in enumerate(mixes):
            groups = (mix.get("groups") or []) if isinstance(mix, dict) else []
            for g, group in enumerate(groups):
                if isinstance(group, dict) and isinstance(group.get("network"), dict):
                    group["network"] = _schedule(group["network"], f"spec.sweep.client_mixes[{m}].groups[{g}].network")
    profiles = sweep.get("network_profiles") or sweep.get("networkProfiles") or []
    normalised = []
    for index, entry in enumerate(profiles):
        profile = {"name": entry} if isinstance(entry, str) else dict(entry)
        profile = _schedule(profile, f"spec.sweep.network_profiles[{index}]")
        netem = profile.get("netem")
        if isinstance(netem, dict) and set(netem) & set(STRING_FIELDS):
            typed = netem_from_strings({k: str(v) for k, v in netem.items()},
                                       f"spec.sweep.network_profiles[{index}].netem")
            profile["netem"] = json_format.MessageToDict(typed, preserving_proto_field_name=True)
        normalised.append(profile)
    if profiles:
        sweep = {k: v for k, v in sweep.items() if k not in ("network_profiles", "networkProfiles")}
        sweep["network_profiles"] = normalised
        document = {**document, "sweep": sweep}
    return document


def parse_experiment(text: str, source: str = "experiment") -> controller_pb2.ExperimentSpec:
    """An ExperimentSpec from YAML or JSON text (JSON is YAML)."""
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InvalidArgument(f"{source}: not valid YAML/JSON: {exc}", field="spec") from None
    if not isinstance(document, dict):
        raise InvalidArgument(f"{source}: expected a mapping at the top level", field="spec")
    spec = controller_pb2.ExperimentSpec()
    try:
        json_format.ParseDict(_normalise(document), spec)
    except json_format.ParseError as exc:
        raise InvalidArgument(f"{source}: {exc}", field="spec") from None
    return spec


def load_experiment_file(path: Path) -> controller_pb2.ExperimentSpec:
    return parse_experiment(path.read_text(), str(path))
