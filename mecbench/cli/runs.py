"""`mecbench run` (an experiment file, with live progress), `mecbench experiments ...` and
`mecbench runs list|show|watch|cancel`."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TextIO

from mecbench.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    UsageError,
    enum_value,
    env_client,
    err,
    format_results_table,
    ms,
    named_controller,
    network_text,
    open_client,
    out,
    print_json,
    render_fields,
    render_table,
    scenario_name,
    seconds_text,
    state_name,
    to_jsonable,
    when,
)
from mecbench.cli.stack import embedded_controller
from mecbench.cli.storage import readable_file
from mecbench.client import TERMINAL_STATES, Client
from mecbench.core import durations
from mecbench.experiment_file import load_experiment_file
from mecbench.v1 import common_pb2, controller_pb2

# How often `run` asks for the experiment and its running point: often enough that the QPS
# figure looks live, rarely enough to cost the controller nothing next to a LoadGen test.
POLL_S = 0.25


# --- live progress -----------------------------------------------------------------------------


@dataclass(frozen=True)
class PointStatus:
    """What one line of the progress display says about a point (a run)."""

    selector: str
    state: int
    repeat: int
    repeats: int
    qps: float
    elapsed_s: float
    fraction: float

    @classmethod
    def of(cls, run: controller_pb2.Run) -> PointStatus:
        repeats = run.spec.repeats or run.progress.repeats or 1
        repeat = run.progress.repeat
        elapsed = durations.to_seconds(run.progress.elapsed)
        if run.state == common_pb2.RUN_STATE_SUCCEEDED:
            fraction = 1.0
            # Done: the measured figure, not the last live sample.
            qps = sum(r.aggregate.samples_per_second for r in run.results) / max(len(run.results), 1)
            repeat = len(run.results) or repeat
        else:
            # LoadGen runs a test for at least min_duration: elapsed against it is the best
            # estimate of how far the current repeat is (it may run longer for min_query_count).
            minimum = durations.to_seconds(run.spec.settings.min_duration)
            within = 0.0
            if run.state == common_pb2.RUN_STATE_RUNNING and minimum > 0:
                within = min(elapsed / minimum, 1.0)
            elif run.state == common_pb2.RUN_STATE_UPLOADING:
                within = 1.0  # the test is over; its files are being stored
            fraction = (max(repeat - 1, 0) + within) / repeats
            qps = run.progress.live_qps
        return cls(run.spec.selector or run.run_id, run.state, repeat, repeats, qps, elapsed, fraction)

    def line(self, width: int) -> str:
        return (
            f"{self.selector.ljust(width)}  {bar(self.fraction)}  {state_name(self.state):<10}"
            f"  repeat {self.repeat}/{self.repeats}  {self.qps:9.1f} QPS  {self.elapsed_s:6.1f}s"
        )

    def milestone(self) -> tuple[int, int]:
        """What a line-per-change display prints a new line for."""
        return self.state, self.repeat


def bar(fraction: float, cells: int = 20) -> str:
    filled = round(max(0.0, min(fraction, 1.0)) * cells)
    return "[" + "#" * filled + "." * (cells - filled) + "]"


class ProgressView:
    """One line per point and an overall line. On a terminal the block is redrawn in place with
    ANSI cursor movement; elsewhere (a pipe, a CI log) a line is printed whenever a point changes
    state or repeat, so the output reads as a log."""

    def __init__(self, stream: TextIO, tty: bool) -> None:
        self.stream = stream
        self.tty = tty
        self.drawn = 0
        self.milestones: dict[str, tuple[int, int]] = {}
        self.overall: tuple[int, int, str] | None = None
        self.started = time.monotonic()

    def update(self, experiment: controller_pb2.Experiment, runs: Sequence[controller_pb2.Run]) -> None:
        points = [PointStatus.of(run) for run in runs]
        width = max([len(p.selector) for p in points] + [len("overall")])
        note = ""
        if experiment.state == common_pb2.RUN_STATE_RUNNING and not runs:
            calibrating = not experiment.spec.skip_calibration and not experiment.HasField("calibration")
            note = "measuring the harness's floor" if calibrating else "starting"
        total = experiment.points_total or len(runs)
        done_fraction = experiment.points_done / total if total else 0.0
        if points and points[-1].state not in TERMINAL_STATES and total:
            done_fraction += points[-1].fraction / total
        overall = (
            f"{'overall'.ljust(width)}  {bar(done_fraction)}  {state_name(experiment.state):<10}"
            f"  {experiment.points_done}/{total} points  {time.monotonic() - self.started:.0f}s"
            + (f"  ({note})" if note else "")
        )
        if self.tty:
            self._redraw([point.line(width) for point in points] + [overall])
            return
        for run, point in zip(runs, points, strict=True):
            if self.milestones.get(run.run_id) != point.milestone():
                self.milestones[run.run_id] = point.milestone()
                self._write(point.line(width))
        key = (experiment.state, experiment.points_done, note)
        if key != self.overall:
            self.overall = key
            self._write(overall)

    def finish(self) -> None:
        """Leave the cursor below the block, so what follows does not overwrite it."""
        self.drawn = 0

    def _redraw(self, lines: list[str]) -> None:
        columns = shutil.get_terminal_size((120, 24)).columns
        text = f"\x1b[{self.drawn}F" if self.drawn else ""
        # Each line cut to the terminal's width: a wrapped line would throw the count off.
        text += "".join(f"\x1b[2K{line[: columns - 1]}\n" for line in lines)
        self.stream.write(text)
        self.stream.flush()
        self.drawn = len(lines)

    def _write(self, line: str) -> None:
        self.stream.write(line.rstrip() + "\n")
        self.stream.flush()


def follow_experiment(
    client: Client, experiment_id: str, view: ProgressView | None, *, cancel_on_interrupt: bool = True
) -> controller_pb2.Experiment:
    """Poll the experiment and its points to the end, drawing progress. Ctrl-C cancels the
    experiment (when `cancel_on_interrupt`: it was started here) and waits for its clean-up
    before re-raising."""
    runs: dict[str, controller_pb2.Run] = {}
    try:
        while True:
            experiment = client.get_experiment(experiment_id)
            for run_id in experiment.run_ids:
                cached = runs.get(run_id)
                if cached is None or cached.state not in TERMINAL_STATES:
                    runs[run_id] = client.get_run(run_id)
            if view is not None:
                view.update(experiment, [runs[run_id] for run_id in experiment.run_ids])
            if experiment.state in TERMINAL_STATES:
                return experiment
            time.sleep(POLL_S)
    except KeyboardInterrupt:
        if not cancel_on_interrupt:
            err(f"stopped watching; experiment {experiment_id} goes on")
            raise
        # A second Ctrl-C stops waiting for the clean-up (the controller still does it).
        err(f"cancelling experiment {experiment_id}")
        client.cancel_experiment(experiment_id)
        while client.get_experiment(experiment_id).state not in TERMINAL_STATES:
            time.sleep(POLL_S)
        err(f"experiment {experiment_id} cancelled")
        raise
    finally:
        if view is not None:
            view.finish()


def experiment_outcome(client: Client, experiment: controller_pb2.Experiment, as_json: bool) -> int:
    """Print the experiment's runs as a table (or JSON); non-zero unless every run succeeded
    and every result is VALID, so a CI pipeline can gate on it."""
    runs = [client.get_run(run_id) for run_id in experiment.run_ids]
    if as_json:
        print_json({"experiment": experiment, "runs": runs})
    else:
        out()
        out(format_results_table([(run.spec.selector or run.run_id, run) for run in runs]))
        for peak in experiment.peaks:
            out(
                f"peak {peak.network_profile or 'unshaped'} x{peak.clients}: {peak.peak_qps:.1f} QPS"
                f" within the latency bound"
            )
        if experiment.HasField("calibration"):
            floor = experiment.calibration
            if floor.error:
                out(f"harness calibration failed: {floor.error}")
            else:
                out(
                    "harness floor (zero-time SUT, 1 client, unshaped): SingleStream p50"
                    f" {ms(floor.single_stream_latency.p50)} ms, p99 {ms(floor.single_stream_latency.p99)} ms;"
                    f" Offline ceiling {floor.offline_samples_per_second:.0f} samples/s"
                )
        out(
            f"experiment {experiment.experiment_id}: {state_name(experiment.state)}"
            + (f": {experiment.error}" if experiment.error else "")
        )
    invalid = [
        f"{run.spec.selector} #{repeat.repeat}" for run in runs for repeat in run.results if not repeat.aggregate.valid
    ]
    if invalid and not as_json:
        err(f"INVALID results: {', '.join(invalid)}")
    ok = experiment.state == common_pb2.RUN_STATE_SUCCEEDED and not invalid
    return EXIT_OK if ok else EXIT_FAILED


def _progress_view(as_json: bool) -> ProgressView | None:
    """Progress on stdout with text output; with --json stdout is for the JSON alone, so
    progress goes to stderr, and only when a person watches it there."""
    if not as_json:
        return ProgressView(sys.stdout, sys.stdout.isatty() and os.environ.get("TERM") != "dumb")
    if sys.stderr.isatty():
        return ProgressView(sys.stderr, os.environ.get("TERM") != "dumb")
    return None


def run_experiment(args: argparse.Namespace) -> int:
    spec = load_experiment_file(readable_file(args.file))
    if args.experiment_id:
        spec.experiment_id = args.experiment_id
    address = named_controller(args)
    if address:
        with open_client(args, address) as client:
            experiment = client.start_experiment(spec)
            if not args.wait:
                if args.json:
                    print_json(experiment)
                else:
                    out(f"experiment {experiment.experiment_id} started: {experiment.points_total} points")
                    out(f"follow it with: mecbench experiments watch {experiment.experiment_id}")
                return EXIT_OK
            if not args.json:
                out(f"experiment {experiment.experiment_id}: {experiment.points_total} points on {address}", flush=True)
            final = follow_experiment(client, experiment.experiment_id, _progress_view(args.json))
            return experiment_outcome(client, final, args.json)
    # No controller named or up: run this one experiment on an embedded controller (local processes).
    # The embedded controller reads TLS and tokens from this environment, not from the flags.
    with embedded_controller(args.data_dir, "mecbench-run-") as (port, data_dir), env_client(
        f"127.0.0.1:{port}"
    ) as client:
        client.init_storage()
        if not args.json:
            out(f"embedded controller on 127.0.0.1:{port}, results in {data_dir}", flush=True)
        experiment = client.start_experiment(spec)
        final = follow_experiment(client, experiment.experiment_id, _progress_view(args.json))
        return experiment_outcome(client, final, args.json)


# --- experiments --------------------------------------------------------------------------------


def experiments_list(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        experiments = client.list_experiments()
    if args.json:
        print_json(experiments)
        return EXIT_OK
    if not experiments:
        out("no experiments")
        return EXIT_OK
    rows = [
        [
            e.experiment_id,
            state_name(e.state),
            f"{e.points_done}/{e.points_total}",
            when(e.created_at),
            when(e.finished_at) or "-",
            e.error or "",
        ]
        for e in experiments
    ]
    out(render_table(["experiment", "state", "points", "created", "finished", "error"], rows))
    return EXIT_OK


def experiments_show(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        experiment = client.get_experiment(args.experiment_id)
        if args.json:
            print_json(experiment)
            return EXIT_OK
        out(
            render_fields(
                [
                    ("experiment", experiment.experiment_id),
                    ("state", state_name(experiment.state)),
                    ("points", f"{experiment.points_done}/{experiment.points_total} done"),
                    ("created", when(experiment.created_at)),
                    ("finished", when(experiment.finished_at)),
                    ("error", experiment.error),
                ]
            )
        )
        # The same table and summary lines `run --wait` ends with; showing is not judging, so 0.
        experiment_outcome(client, experiment, as_json=False)
    return EXIT_OK


def experiments_watch(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        final = follow_experiment(
            client, args.experiment_id, _progress_view(args.json), cancel_on_interrupt=False
        )
        return experiment_outcome(client, final, args.json)


def experiments_cancel(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        experiment = client.get_experiment(args.experiment_id)
        if experiment.state not in TERMINAL_STATES:
            client.cancel_experiment(args.experiment_id)
            deadline = time.monotonic() + args.timeout
            while experiment.state not in TERMINAL_STATES and time.monotonic() < deadline:
                time.sleep(POLL_S)
                experiment = client.get_experiment(args.experiment_id)
    if args.json:
        print_json(experiment)
    else:
        out(f"experiment {experiment.experiment_id}: {state_name(experiment.state)}")
    return EXIT_OK if experiment.state in TERMINAL_STATES else EXIT_FAILED


# --- runs ---------------------------------------------------------------------------------------


def _repeats_text(run: controller_pb2.Run) -> str:
    return f"{len(run.results)}/{run.spec.repeats or 1}"


def runs_list(args: argparse.Namespace) -> int:
    state = enum_value(common_pb2.RunState, "RUN_STATE_", args.state, "--state") if args.state else 0
    if args.limit < 1:
        raise UsageError("--limit: must be at least 1")
    with open_client(args) as client:
        runs = client.list_runs(
            experiment_id=args.experiment,
            state=state or None,  # type: ignore[arg-type]
            limit=args.limit,
        )
    if args.json:
        print_json(runs)
        return EXIT_OK
    if not runs:
        out("no runs")
        return EXIT_OK
    rows = [
        [
            run.run_id,
            run.spec.experiment_id or "-",
            run.spec.selector or "-",
            state_name(run.state),
            _repeats_text(run),
            when(run.created_at),
        ]
        for run in runs
    ]
    out(render_table(["run", "experiment", "selector", "state", "repeats", "created"], rows))
    return EXIT_OK


def _spec_fields(run: controller_pb2.Run) -> list[tuple[str, str]]:
    spec = run.spec
    settings = spec.settings
    scenario = scenario_name(settings.scenario)
    if settings.scenario == common_pb2.SCENARIO_SERVER and settings.server_target_qps:
        scenario += f" @ {settings.server_target_qps:g} QPS"
        if settings.HasField("server_target_latency"):
            scenario += f", bound {ms(settings.server_target_latency)} ms"
    sut = spec.sut_id or (spec.sut.WhichOneof("backend") or "")
    if spec.sut_id and spec.sut.WhichOneof("backend"):
        sut += f" ({spec.sut.WhichOneof('backend')})"
    took = ""
    if run.finished_at.seconds and run.started_at.seconds:
        took = f"{(run.finished_at.ToNanoseconds() - run.started_at.ToNanoseconds()) / 1e9:.1f}s"
    return [
        ("run", run.run_id),
        ("state", state_name(run.state)),
        ("experiment", spec.experiment_id),
        ("selector", spec.selector),
        ("scenario", scenario),
        ("clients", str(spec.clients or 1)),
        ("repeats", _repeats_text(run) + " done"),
        ("network", network_text(spec.network)),
        ("SUT", sut),
        ("dataset", spec.dataset.uri or ("synthetic" if spec.dataset.HasField("synthetic") else "")),
        ("min duration", seconds_text(settings.min_duration) if settings.HasField("min_duration") else ""),
        ("created", when(run.created_at)),
        ("started", when(run.started_at)),
        ("finished", when(run.finished_at) + (f" (took {took})" if took else "")),
        ("error", run.error),
        ("spooled", "results wait in the local spool for the store" if run.results_spooled else ""),
    ]


def runs_show(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        run = client.get_run(args.run_id)
    if args.json:
        print_json(run)
        return EXIT_OK
    out(render_fields(_spec_fields(run)))
    if run.results:
        out()
        out(format_results_table([(run.spec.selector or run.run_id, run)]))
        for repeat in run.results:
            reasons = "; ".join(repeat.aggregate.invalid_reasons)
            out(f"#{repeat.repeat}: {repeat.result_uri}" + (f"  INVALID: {reasons}" if reasons else ""))
    return EXIT_OK


def run_exit_code(run: controller_pb2.Run) -> int:
    """0 only for a run that succeeded with every result VALID, as `run --wait` judges."""
    invalid = [r.repeat for r in run.results if not r.aggregate.valid]
    if invalid:
        err(f"run {run.run_id}: INVALID results in repeat(s) {', '.join(map(str, invalid))}")
    if run.state != common_pb2.RUN_STATE_SUCCEEDED:
        err(f"run {run.run_id}: {state_name(run.state)}" + (f": {run.error}" if run.error else ""))
        return EXIT_FAILED
    return EXIT_FAILED if invalid else EXIT_OK


def runs_watch(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        final: controller_pb2.Run | None = None
        last_printed = 0.0
        last_key: tuple[int, int, str] | None = None
        for event in client.watch_run(args.run_id):
            final = event.run
            if args.json:
                # One object per line: a script reads events as they come.
                out(json.dumps(to_jsonable(event)), flush=True)
                continue
            key = (event.state, event.progress.repeat, event.message)
            now = time.monotonic()
            # Progress events come several times a second: a line a second is enough to read.
            if key == last_key and now - last_printed < 1.0 and event.state not in TERMINAL_STATES:
                continue
            last_key, last_printed = key, now
            progress = event.progress
            line = (
                f"{when(event.time) or '-'}  {state_name(event.state):<10}  repeat"
                f" {progress.repeat}/{progress.repeats or event.run.spec.repeats or 1}"
            )
            if event.state == common_pb2.RUN_STATE_RUNNING:
                line += f"  {progress.live_qps:9.1f} QPS  {durations.to_seconds(progress.elapsed):6.1f}s"
            out(line + (f"  {event.message}" if event.message else ""), flush=True)
    if final is None:  # the stream ended with no event: ask once
        with open_client(args) as client:
            final = client.get_run(args.run_id)
    if not args.json and final.results:
        out()
        out(format_results_table([(final.spec.selector or final.run_id, final)]))
    return run_exit_code(final)


def runs_cancel(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        run = client.get_run(args.run_id)
        if run.state in TERMINAL_STATES:
            message = f"run {run.run_id} had already ended: {state_name(run.state)}"
        else:
            run = client.cancel_run(args.run_id)
            deadline = time.monotonic() + args.timeout
            # Cancelling stops the LoadGen test and cleans up (shaping, SUT hold): wait for it,
            # so that when this returns the SUT is free for the next run.
            while run.state not in TERMINAL_STATES and time.monotonic() < deadline:
                time.sleep(POLL_S)
                run = client.get_run(args.run_id)
            message = f"run {run.run_id}: {state_name(run.state)}"
            if run.state not in TERMINAL_STATES:
                message += f" (cancel requested; still not ended after {args.timeout:g}s)"
    if args.json:
        print_json(run)
    else:
        out(message)
    return EXIT_OK if run.state in TERMINAL_STATES else EXIT_FAILED
