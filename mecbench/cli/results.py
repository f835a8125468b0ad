"""`mecbench results list|show|compare|export`, `mecbench plot` and `mecbench report`."""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mecbench.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    NotFound,
    UsageError,
    enum_value,
    err,
    ms,
    open_client,
    out,
    print_json,
    render_fields,
    render_table,
    scenario_name,
    seconds_text,
    when,
)
from mecbench.client import Client, ResultTable, result_rows
from mecbench.client_errors import NotFoundError
from mecbench.core import durations
from mecbench.v1 import common_pb2, controller_pb2

# What `results list` shows on a terminal; `--wide` (and CSV) give every column.
LIST_COLUMNS = [
    "experiment_id",
    "selector",
    "run_id",
    "repeat",
    "scenario",
    "clients",
    "network_profile",
    "valid",
    "samples_per_second",
    "latency_p50_ms",
    "latency_p99_ms",
]
# Shown as well when any row has a value in them (LLM and accuracy runs).
OPTIONAL_COLUMNS = ["ttft_p50_ms", "tpot_p50_ms", "tokens_per_second", "accuracy_metric", "accuracy"]


def add_result_filters(command: argparse.ArgumentParser) -> None:
    filters = command.add_argument_group("filters (every one given must match)")
    filters.add_argument("--experiment", default="", metavar="ID")
    filters.add_argument("--selector", default="", help="a point, e.g. server-c2-lte-q200")
    filters.add_argument("--run", default="", metavar="RUN_ID")
    filters.add_argument("--profile", default="", metavar="NAME", help="network profile name")
    filters.add_argument("--sut-backend", default="", metavar="NAME", help="synthetic, onnxruntime, external...")
    filters.add_argument("--scenario", default="", help="SingleStream, MultiStream, Server or Offline")


def _records(client: Client, args: argparse.Namespace) -> list[controller_pb2.ResultRecord]:
    scenario = enum_value(common_pb2.Scenario, "SCENARIO_", args.scenario, "--scenario") if args.scenario else 0
    return client.list_results(
        experiment_id=args.experiment,
        selector=args.selector,
        run_id=args.run,
        network_profile=args.profile,
        sut_backend=args.sut_backend,
        scenario=scenario,  # type: ignore[arg-type]
    )


def _shown_columns(table: ResultTable) -> list[str]:
    # Runs with client groups get a row per group beside the pooled one: the group names them.
    columns = list(LIST_COLUMNS)
    if any(table.column("group")):
        columns.insert(columns.index("network_profile") + 1, "group")
    return columns + [name for name in OPTIONAL_COLUMNS if any(v is not None for v in table.column(name))]


def results_list(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        records = _records(client, args)
    if args.json:
        print_json(records)
        return EXIT_OK
    if not records:
        out("no results")
        return EXIT_OK
    table = result_rows(records)
    out(table.to_text(None if args.wide else _shown_columns(table)))
    return EXIT_OK


def results_export(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        records = _records(client, args)
    table = result_rows(records)
    if args.json:
        print_json(table.rows)
        return EXIT_OK
    if args.csv in ("", "-"):
        table.to_csv(sys.stdout)
        return EXIT_OK
    path = Path(args.csv)
    if path.parent and not path.parent.is_dir():
        raise UsageError(f"--csv {args.csv}: no such directory {path.parent}")
    table.to_csv(path)
    out(f"wrote {len(table)} rows to {path}")
    return EXIT_OK


def _result_fields(record: controller_pb2.ResultRecord) -> list[tuple[str, str]]:
    result = record.result
    latency = result.latency
    verdict = "VALID" if result.valid else "INVALID"
    if result.invalid_reasons:
        verdict += ": " + "; ".join(result.invalid_reasons)
    fields = [
        ("run", f"{record.run_id} repeat {record.repeat}"),
        ("experiment", record.experiment_id),
        ("selector", record.selector),
        ("scenario", scenario_name(record.scenario or result.scenario)),
        ("clients", str(record.clients or 1)),
        ("network", record.network_profile or "unshaped"),
        ("SUT backend", record.sut_backend),
        ("created", when(record.created_at)),
        ("result", verdict),
        ("samples/s", f"{result.samples_per_second:.1f}"),
        (
            "latency ms",
            f"p50 {ms(latency.p50)}  p90 {ms(latency.p90)}  p99 {ms(latency.p99)}  max {ms(latency.max)}",
        ),
        ("queries", f"{result.query_count} ({result.sample_count} samples)"),
        ("duration", seconds_text(result.test_duration) if result.HasField("test_duration") else ""),
        ("LoadGen set-up", seconds_text(record.loadgen_setup_time) if record.HasField("loadgen_setup_time") else ""),
    ]
    if result.HasField("ttft"):
        fields += [
            ("TTFT ms", f"p50 {ms(result.ttft.p50)}  p99 {ms(result.ttft.p99)}"),
            ("TPOT ms", f"p50 {ms(result.tpot.p50)}  p99 {ms(result.tpot.p99)}"),
            ("tokens/s", f"{result.tokens_per_second:.1f}"),
        ]
    if result.accuracy:
        fields.append(("accuracy", ", ".join(f"{k} {v:.4f}" for k, v in sorted(result.accuracy.items()))))
    if result.error_count or result.warning_count:
        fields.append(("LoadGen log", f"{result.error_count} errors, {result.warning_count} warnings"))
    fields += [("files", ", ".join(record.files)), ("stored at", record.result_uri)]
    return fields


def _files_named(record: controller_pb2.ResultRecord, name: str) -> list[str]:
    """The stored files `name` means: itself, else every client's copy of it (a run with several
    clients keeps `client-<i>/mlperf_log_summary.txt`, one per client)."""
    if name in record.files:
        return [name]
    return [f for f in record.files if f.endswith(f"/{name}")]


def results_show(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        record = client.get_result(args.run_id, args.repeat).record
        if args.file:
            names = _files_named(record, args.file)
            if not names:
                # Exit 4 like any other name that does not exist (the server would say INVALID_ARGUMENT).
                raise NotFound(
                    f"no file {args.file!r} in run {record.run_id} repeat {record.repeat}"
                    f" (have: {', '.join(record.files) or 'none'})"
                )
            response = client.get_result(args.run_id, record.repeat, include_files=names)
    if args.file:
        contents = {name: b"".join(c.data for c in response.files if c.name == name) for name in names}
        sys.stdout.flush()
        ends_line = True
        for name, data in contents.items():
            if len(contents) > 1:
                # Several clients' copies: each under a header, as `tail` prints several files.
                sys.stdout.buffer.write(("" if ends_line else "\n").encode() + f"==> {name} <==\n".encode())
                ends_line = data.endswith(b"\n")
            # Bytes as stored: a log is text, but a file may not be, and a pipe wants it exact.
            sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return EXIT_OK
    if args.json:
        print_json(record)
        return EXIT_OK
    out(render_fields(_result_fields(record)))
    return EXIT_OK


# --- compare ------------------------------------------------------------------------------------


@dataclass
class Side:
    """One side of a comparison: a run, or an experiment's points."""

    ident: str
    kind: str
    records: list[controller_pb2.ResultRecord] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.kind} {self.ident}"


@dataclass(frozen=True)
class Summary:
    """A point's figures: the median over its repeats, robust to one disturbed repeat."""

    samples_per_second: float
    p50_ms: float
    p99_ms: float
    repeats: int
    valid: bool

    @classmethod
    def of(cls, records: Sequence[controller_pb2.ResultRecord]) -> Summary:
        def median_ms(name: str) -> float:
            return statistics.median(durations.to_ns(getattr(r.result.latency, name)) / 1e6 for r in records)

        return cls(
            samples_per_second=statistics.median(r.result.samples_per_second for r in records),
            p50_ms=median_ms("p50"),
            p99_ms=median_ms("p99"),
            repeats=len(records),
            valid=all(r.result.valid for r in records),
        )


def _resolve(client: Client, ident: str) -> Side:
    """A run id or an experiment id, whichever exists, with its stored results (an experiment's
    calibration runs left out: they measure the harness, not a point of the sweep)."""
    try:
        run = client.get_run(ident)
    except NotFoundError:
        pass
    else:
        return Side(ident, "run", client.list_results(run_id=run.run_id))
    try:
        experiment = client.get_experiment(ident)
    except NotFoundError:
        raise NotFound(f"{ident}: no run or experiment by that id") from None
    calibration = set(experiment.calibration.run_ids)
    records = [r for r in client.list_results(experiment_id=ident) if r.run_id not in calibration]
    return Side(ident, "experiment", records)


def _by_point(side: Side) -> dict[str, Summary]:
    grouped: dict[str, list[controller_pb2.ResultRecord]] = {}
    for record in side.records:
        grouped.setdefault(record.selector, []).append(record)
    return {selector: Summary.of(records) for selector, records in grouped.items()}


@dataclass(frozen=True)
class ComparedPoint:
    """One row of a comparison: a point's figures on each side (None where a side lacks it)."""

    point: str
    a: Summary | None
    b: Summary | None

    def ratio(self, name: str) -> float | None:
        """B/A of one figure; None unless both sides have it and A's is not zero."""
        if self.a is None or self.b is None:
            return None
        base: float = getattr(self.a, name)
        return float(getattr(self.b, name)) / base if base else None

    def to_json(self) -> dict[str, object]:
        return {
            "point": self.point,
            "a": None if self.a is None else vars(self.a),
            "b": None if self.b is None else vars(self.b),
            "ratio": {name: self.ratio(name) for name in COMPARED},
        }


# Compared figures and the digits they are shown with.
COMPARED = {"samples_per_second": 1, "p50_ms": 3, "p99_ms": 3}


def results_compare(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        a, b = _resolve(client, args.a), _resolve(client, args.b)
    points_a, points_b = _by_point(a), _by_point(b)
    if a.kind == "run" and b.kind == "run" and len(points_a) == 1 and len(points_b) == 1:
        # Two runs are two points by definition, whatever their selectors: compare them.
        (name_a, summary_a), (name_b, summary_b) = next(iter(points_a.items())), next(iter(points_b.items()))
        name = name_a if name_a == name_b else f"{name_a} | {name_b}"
        points_a, points_b = {name: summary_a}, {name: summary_b}
    names = list(dict.fromkeys([*points_a, *points_b]))
    rows = [ComparedPoint(name, points_a.get(name), points_b.get(name)) for name in names]
    if args.json:
        print_json(
            {
                "a": {"kind": a.kind, "id": a.ident},
                "b": {"kind": b.kind, "id": b.ident},
                "points": [row.to_json() for row in rows],
            }
        )
    else:
        out(f"A = {a.label}   B = {b.label}   (median over repeats; B/A above 1: more throughput, or more latency)")
        out(_compare_table(rows))
    if not any(row.a is not None and row.b is not None for row in rows):
        err(
            f"no point in common: {a.label} has {', '.join(points_a) or 'no results'};"
            f" {b.label} has {', '.join(points_b) or 'no results'}"
        )
        return EXIT_FAILED
    return EXIT_OK


def _compare_table(rows: list[ComparedPoint]) -> str:
    def figure(side: Summary | None, name: str) -> str:
        if side is None:
            return "-"
        text = f"{getattr(side, name):.{COMPARED[name]}f}"
        return text if side.valid else f"{text}!"

    def ratio(row: ComparedPoint, name: str) -> str:
        value = row.ratio(name)
        return "-" if value is None else f"{value:.2f}x"

    def cells(row: ComparedPoint, name: str) -> tuple[str, str, str]:
        return figure(row.a, name), figure(row.b, name), ratio(row, name)

    header = ["point"]
    for label in ("samples/s", "p50 ms", "p99 ms"):
        header += [f"A {label}", f"B {label}", "B/A"]
    lines = [
        [row.point, *(cell for name in COMPARED for cell in cells(row, name))]
        for row in rows
    ]
    table = render_table(header, lines)
    if any(side is not None and not side.valid for row in rows for side in (row.a, row.b)):
        table += "\n!: a repeat of this point is INVALID"
    return table


# --- figures ------------------------------------------------------------------------------------


def _out_dir(path: str) -> Path:
    out_dir = Path(path)
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out {path}: not a directory")
    return out_dir


def plot(args: argparse.Namespace) -> int:
    # Imported here: matplotlib costs a second at start-up that no other command should pay.
    from mecbench.report import collect_report_data, render_figures

    out_dir = _out_dir(args.out)
    with open_client(args) as client:
        data = collect_report_data(client, args.experiment_id)
    figures = render_figures(data, out_dir)
    if args.json:
        print_json({"figures": [str(path) for path in figures], "notes": data.notes})
    else:
        for path in figures:
            out(str(path))
        for note in data.notes:
            err(f"note: {note}")
        if not figures:
            err(f"experiment {args.experiment_id} has no results to plot yet")
    return EXIT_OK if figures else EXIT_FAILED


def report(args: argparse.Namespace) -> int:
    from mecbench.report import FIGURES, collect_report_data, write_report

    out_dir = _out_dir(args.out)
    with open_client(args) as client:
        data = collect_report_data(client, args.experiment_id)
    page = write_report(data, out_dir)
    figures = [out_dir / name for name in FIGURES if (out_dir / name).is_file()]
    if args.json:
        print_json({"report": str(page), "figures": [str(path) for path in figures], "notes": data.notes})
    else:
        for path in [*figures, page]:
            out(str(path))
        for note in data.notes:
            err(f"note: {note}")
    return EXIT_OK
