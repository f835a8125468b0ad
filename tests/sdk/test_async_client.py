"""`mecbench.AsyncClient` (grpc.aio) against a real controller and the stand-in server; each test
runs its coroutine with asyncio.run, one event loop (and so one channel) per test."""

from __future__ import annotations

import asyncio
import csv
import io
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from mecbench import AsyncClient, InvalidArgumentError, NotFoundError, UnavailableError
from mecbench.core import durations
from mecbench.v1 import common_pb2, controller_pb2
from tests.controller.conftest import Stack, short_settings, start_stack, stop_stack, synthetic_sut
from tests.sdk import FakeController, controller_later, free_port, spec_file, tls_fake


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    running = start_stack(tmp_path_factory.mktemp("sdk-aio-controller"))
    yield running
    stop_stack(running)


def run_spec(selector: str, seconds: float) -> controller_pb2.RunSpec:
    return controller_pb2.RunSpec(
        experiment_id="sdk-aio-runs",
        selector=selector,
        sut_id="sdk-aio-sut",
        settings=short_settings(
            common_pb2.SCENARIO_SINGLE_STREAM, min_duration=durations.from_seconds(seconds),
            single_stream_expected_latency=durations.from_seconds(0.001),
        ),
    )


def test_an_experiment_from_a_file_is_watched_and_tabled(stack: Stack, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with AsyncClient(stack.server.address) as client:
            await client.init_storage()
            started = await client.start_experiment(spec_file(tmp_path, "sdk-aio", clients="1, 2"))
            assert started.points_total == 2
            seen = [e async for e in client.watch_experiment("sdk-aio", poll_s=0.1, timeout=60)]
            assert seen[-1].state == common_pb2.RUN_STATE_SUCCEEDED, seen[-1].error
            assert [e.points_done for e in seen][-1] == 2
            assert "sdk-aio" in {e.experiment_id for e in await client.list_experiments()}
            assert (await client.wait_experiment("sdk-aio", timeout=5)).state == common_pb2.RUN_STATE_SUCCEEDED

            table = await client.results_table(experiment_id="sdk-aio")
            assert sorted(table.column("clients")) == [1, 2]  # type: ignore[type-var]
            assert set(table.column("run_id")) == set(seen[-1].run_ids)
            back = list(csv.DictReader(io.StringIO(table.to_csv())))
            assert [row["selector"] for row in back] == table.column("selector")
            runs = await client.list_runs(experiment_id="sdk-aio")
            assert {run.run_id for run in runs} == set(seen[-1].run_ids)
            record = (await client.get_result(runs[0].run_id)).record
            summary = next(name for name in record.files if name.endswith("mlperf_log_summary.txt"))
            result = await client.get_result(runs[0].run_id, 1, [summary])
            assert result.files[0].name == summary and b"MLPerf Results Summary" in result.files[0].data

    asyncio.run(scenario())


def test_runs_are_watched_waited_for_and_cancelled(stack: Stack, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with AsyncClient(stack.server.address) as client:
            deployed = await client.deploy_sut("sdk-aio-sut", synthetic_sut(0.001))
            assert deployed.sut_id == "sdk-aio-sut"
            run = await client.start_run(run_spec("aio-short", 0.5))
            events = [event async for event in client.watch_run(run.run_id, timeout=60)]
            assert events[0].message == "current state"
            assert events[-1].state == common_pb2.RUN_STATE_SUCCEEDED, events[-1].run.error
            assert (await client.get_run(run.run_id)).results[0].aggregate.valid

            long = await client.start_run(run_spec("aio-long", 30))
            async for event in client.watch_run(long.run_id, timeout=30):
                if event.state == common_pb2.RUN_STATE_RUNNING and event.progress.samples_completed:
                    break
            await client.cancel_run(long.run_id)
            final = await client.wait_run(long.run_id, timeout=30)
            assert final.state == common_pb2.RUN_STATE_CANCELLED

            blob = tmp_path / "dataset.bin"
            blob.write_bytes(b"\x00" * (3 * 1024 * 1024 + 5))  # more than one upload chunk
            dataset = await client.upload_dataset(blob)
            assert dataset.uri.endswith("datasets/dataset.bin")
            assert "datasets/dataset.bin" in {b.key for b in await client.list_blobs("datasets/")}
            assert isinstance(await client.list_nodes(), list)
            assert isinstance(await client.get_metrics(run_id=run.run_id), list)
            listed = await client.call("ListRuns", controller_pb2.ListRunsRequest(experiment_id="sdk-aio-runs"))
            assert {r.run_id for r in listed.runs} == {run.run_id, long.run_id}

    asyncio.run(scenario())


def test_errors_are_typed(stack: Stack, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with AsyncClient(stack.server.address) as client:
            with pytest.raises(NotFoundError) as missing:
                await client.get_run("run-nowhere")
            assert missing.value.code == grpc.StatusCode.NOT_FOUND and missing.value.method == "GetRun"
            bad = spec_file(tmp_path, "sdk-aio-bad")
            bad.write_text(bad.read_text().replace("clients: [1, 2]", "clients: [0, 2]"))
            with pytest.raises(InvalidArgumentError) as invalid:
                await client.start_experiment(bad)
            assert "spec.sweep.clients[0]" in invalid.value.field_violations
            assert "spec.sweep.clients[0]" in str(invalid.value)
            bad.write_text("sweep: {clients: nope}\n")
            with pytest.raises(InvalidArgumentError) as unparsed:
                await client.start_experiment(bad)
            assert unparsed.value.rpc_error is None

    asyncio.run(scenario())


def test_retries_backoff_and_reconnects() -> None:
    async def scenario() -> None:
        async with AsyncClient(f"127.0.0.1:{free_port()}", retries=2, backoff_s=0.1) as nowhere:
            began = time.monotonic()
            with pytest.raises(UnavailableError):
                await nowhere.list_experiments()
            assert time.monotonic() - began >= 0.1 + 0.2  # lower bound only

        fake = FakeController(get_run_failures=2)
        try:
            async with AsyncClient(fake.address, retries=2, backoff_s=0.01) as client:
                assert (await client.get_run("third")).run_id == "third"
                assert fake.calls["GetRun"] == 3
                with pytest.raises(UnavailableError):
                    await client.start_run(controller_pb2.RunSpec(selector="once"))
                assert fake.calls["StartRun"] == 1
                messages = [event.message async for event in client.watch_run("r")]
                assert messages == ["running", "current state", "succeeded"]
        finally:
            fake.stop()

    asyncio.run(scenario())


def test_a_controller_that_starts_late_is_reached(tmp_path: Path) -> None:
    port = free_port()
    thread, started = controller_later(port, tmp_path, delay_s=0.4)

    async def scenario() -> None:
        async with AsyncClient(f"127.0.0.1:{port}", retries=6, backoff_s=0.2) as client:
            assert await client.list_experiments() == []

    try:
        asyncio.run(scenario())
    finally:
        thread.join()
        for server in started:
            server.stop(grace=1.0)


def test_token_and_tls(tmp_path: Path) -> None:
    plain = FakeController()
    secure, ca_file = tls_fake(tmp_path)

    async def scenario() -> None:
        async with AsyncClient(plain.address, token="aio-token") as client:
            await client.get_run("a")
        async with AsyncClient(f"localhost:{secure.port}", ca_file=ca_file, token="aio-tls", retries=0) as client:
            assert (await client.get_run("tls")).run_id == "tls"
        async with AsyncClient(f"localhost:{secure.port}", tls=True, retries=0) as untrusted:
            with pytest.raises(UnavailableError):
                await untrusted.get_run("x")

    try:
        asyncio.run(scenario())
    finally:
        plain.stop()
        secure.stop()
    assert plain.metadata[-1]["authorization"] == "Bearer aio-token"
    assert secure.metadata[-1]["authorization"] == "Bearer aio-tls"
    assert secure.calls["GetRun"] == 1
