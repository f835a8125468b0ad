"""Experiment reports: a real short experiment through a real controller, its report rendered,
and every figure decoded and checked for content; the numbers behind the figures on hand-made data."""

from __future__ import annotations

import html
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from controller.app import ControllerApp
from controller.server import create_server
from controller.settings import ControllerSettings
from mecbench.client import Client
from mecbench.core import durations
from mecbench.report import (
    CLIENT_FAIRNESS,
    FIGURE_SIZE_PX,
    LATENCY_CDF,
    LATENCY_VS_CLIENTS,
    QPS_VS_CLIENTS,
    REPORT_HTML,
    TELEMETRY,
    PointData,
    RepeatData,
    ReportData,
    collect_report_data,
    empirical_cdf,
    jain_index,
    quantile_step_cdf,
    render_figures,
    report_html,
    write_report,
)
from mecbench.v1 import common_pb2, controller_pb2, sut_agent_pb2
from tests.controller.conftest import short_settings

EXPERIMENT_ID = "report-e2e"
ALL_FIGURES = [LATENCY_VS_CLIENTS, QPS_VS_CLIENTS, LATENCY_CDF, CLIENT_FAIRNESS, TELEMETRY]


@dataclass
class Rendered:
    data: ReportData
    out_dir: Path
    page: Path
    records: list[controller_pb2.ResultRecord]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rendered]:
    """A controller as start_stack builds one, but sampling telemetry every 0.2 s so that 1 s
    tests have a telemetry curve; a 2 x 2 sweep, two repeats each; its report."""
    data_dir = tmp_path_factory.mktemp("report-controller")
    settings = ControllerSettings.load(data_dir=data_dir, telemetry_interval_s=0.2)
    app = ControllerApp(settings)
    server, _port = create_server("127.0.0.1:0", settings, app=app)
    try:
        with Client(server.address) as client:
            spec = controller_pb2.ExperimentSpec(
                experiment_id=EXPERIMENT_ID,
                sut=sut_agent_pb2.SutConfig(synthetic=sut_agent_pb2.SyntheticBackendConfig(
                    distribution=sut_agent_pb2.SERVICE_TIME_DISTRIBUTION_LOGNORMAL,
                    mean=durations.from_seconds(0.002), stddev=durations.from_seconds(0.0005),
                )),
                settings=short_settings(common_pb2.SCENARIO_SINGLE_STREAM,
                                        single_stream_expected_latency=durations.from_seconds(0.002)),
                sweep=controller_pb2.Sweep(
                    scenarios=[common_pb2.SCENARIO_SINGLE_STREAM, common_pb2.SCENARIO_SERVER],
                    clients=[1, 2], server_target_qps=[200], repeats=2,
                ),
            )
            client.start_experiment(spec)
            final = app.experiments.wait(EXPERIMENT_ID, timeout=180)
            assert final.state == common_pb2.RUN_STATE_SUCCEEDED, final.error
            data = collect_report_data(client, EXPERIMENT_ID)
            records = [r for r in client.list_results(experiment_id=EXPERIMENT_ID) if r.run_id in final.run_ids]
        out_dir = tmp_path_factory.mktemp("report")
        yield Rendered(data, out_dir, write_report(data, out_dir), records)
    finally:
        server.stop(grace=1.0)


def assert_png_has_content(path: Path) -> None:
    """Decodes as a PNG of the figure size, with more than one colour and more than 1 % of its
    pixels differing from the background (the most common colour)."""
    with Image.open(path) as image:
        image.load()  # decodes every row, so a truncated file fails here
        assert image.format == "PNG"
        assert image.size == FIGURE_SIZE_PX
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3).astype(np.uint32)
    # One integer per colour: np.unique over rows is much slower than over scalars.
    _colours, counts = np.unique(pixels[:, 0] << 16 | pixels[:, 1] << 8 | pixels[:, 2], return_counts=True)
    assert len(counts) > 1, f"{path.name} is one flat colour"
    drawn = 1 - counts.max() / counts.sum()
    assert drawn > 0.01, f"{path.name}: only {drawn:.2%} of its pixels are not background"


def test_the_report_of_a_real_experiment_has_every_figure_drawn(rendered: Rendered) -> None:
    for name in ALL_FIGURES:
        assert (rendered.out_dir / name).is_file(), f"{name} not drawn"
        assert_png_has_content(rendered.out_dir / name)
    page = rendered.page.read_text(encoding="utf-8")
    assert rendered.page == rendered.out_dir / REPORT_HTML
    assert page.startswith("<!DOCTYPE html>") and "<script" not in page.lower()
    for name in ALL_FIGURES:
        assert f'<img src="{name}"' in page
    selectors = {r.selector for r in rendered.records}
    assert len(selectors) == 4
    for selector in selectors:
        assert f">{selector}<" in page
    # The harness's floor is on the page; its runs are not points.
    assert "Harness floor" in page and "calibration-" not in page
    assert page.count("<tr>") == 1 + 4  # header + one row per point
    # Every image on the page is a file beside it.
    for source in re.findall(r'<img src="([^"]+)"', page):
        assert (rendered.out_dir / html.unescape(source)).is_file()


def test_the_collected_data_has_every_point_repeat_and_client(rendered: Rendered) -> None:
    data = rendered.data
    assert data.experiment.experiment_id == EXPERIMENT_ID and not data.notes
    assert sorted((p.scenario_name, p.clients) for p in data.points) == [
        ("Server", 1), ("Server", 2), ("SingleStream", 1), ("SingleStream", 2)]
    for point in data.points:
        assert point.network_profile == "unshaped" and not point.peak_probe
        assert [r.repeat for r in point.repeats] == [1, 2]
        if point.scenario == common_pb2.SCENARIO_SERVER:
            # The sweep's QPS is the total over the clients, whatever their number.
            assert point.target_qps == pytest.approx(200)
        for repeat in point.repeats:
            assert sorted(repeat.clients) == list(range(point.clients))
            assert repeat.aggregate.samples_per_second > 0
            assert repeat.telemetry, f"{point.selector}: no telemetry"
            assert all(s.cpu_percent >= 0 and s.memory_total_bytes > 0 for s in repeat.telemetry)
            # Every client stores every sample's latency (one measuring mode for every client
            # count), which the report pools.
            assert sorted(repeat.sample_latencies) == list(range(point.clients))
            pooled = np.concatenate(list(repeat.sample_latencies.values()))
            assert len(pooled) == sum(c.sample_count for c in repeat.clients.values())
            assert np.all(pooled > 0)


def test_jain_index_is_one_for_equal_shares_and_one_over_n_for_one_taker() -> None:
    assert jain_index([5.0, 5.0, 5.0, 5.0]) == pytest.approx(1.0)
    assert jain_index([8.0, 0.0, 0.0, 0.0]) == pytest.approx(0.25)
    # (1 + 3)^2 / (2 * (1 + 9)) = 0.8
    assert jain_index([1.0, 3.0]) == pytest.approx(0.8)
    assert jain_index([0.0, 0.0]) == 1.0
    assert jain_index([7.0]) == 1.0
    with pytest.raises(ValueError):
        jain_index([])
    with pytest.raises(ValueError):
        jain_index([1.0, -1.0])


def stats_ms(**quantiles: float) -> common_pb2.LatencyStats:
    stats = common_pb2.LatencyStats()
    for name, ms in quantiles.items():
        getattr(stats, name).CopyFrom(durations.from_seconds(ms / 1000))
    return stats


def test_the_quantile_cdf_steps_through_loadgens_quantiles() -> None:
    stats = stats_ms(min=1, p50=2, p90=3, p95=4, p97=5, p99=6, p999=7, max=9, mean=2.5)
    xs, ys = quantile_step_cdf(stats)
    assert xs.tolist() == pytest.approx([1, 2, 3, 4, 5, 6, 7, 9])
    assert ys.tolist() == [0.0, 0.5, 0.9, 0.95, 0.97, 0.99, 0.999, 1.0]
    # Unset quantiles are left out rather than drawn at zero latency.
    xs, ys = quantile_step_cdf(stats_ms(min=1, p50=2, p99=6, max=9))
    assert xs.tolist() == pytest.approx([1, 2, 6, 9]) and ys.tolist() == [0.0, 0.5, 0.99, 1.0]
    # A quantile rounded below its predecessor does not make the curve go back.
    xs, _ = quantile_step_cdf(stats_ms(min=1, p50=3, p90=2.9, max=4))
    assert np.all(np.diff(xs) >= 0)
    assert quantile_step_cdf(common_pb2.LatencyStats())[0].size == 0


def test_the_empirical_cdf_is_exact_when_small_and_keeps_the_tail_when_thinned() -> None:
    xs, ys = empirical_cdf(np.array([3_000_000, 1_000_000, 2_000_000, 4_000_000]))
    assert xs.tolist() == [1.0, 2.0, 3.0, 4.0] and ys.tolist() == [0.25, 0.5, 0.75, 1.0]
    many = np.arange(1, 1_000_001, dtype=np.int64) * 1000  # 1 us .. 1 s
    xs, ys = empirical_cdf(many, max_points=2000)
    assert len(xs) <= 2002 and xs[0] == pytest.approx(0.001) and xs[-1] == pytest.approx(1000.0)
    assert ys[-1] == 1.0 and np.all(np.diff(ys) > 0)
    # Dense above p99.9, where even spacing alone would leave one or two points.
    assert np.sum(ys > 0.999) >= 50


def test_figures_without_data_are_skipped_and_the_page_escapes_text(tmp_path: Path) -> None:
    result = common_pb2.TestResult(scenario=common_pb2.SCENARIO_SINGLE_STREAM, valid=False, samples_per_second=400,
                                   invalid_reasons=["<b>too few</b> queries"],
                                   latency=stats_ms(min=1, p50=2, p90=3, p95=3.5, p97=4, p99=5, p999=6, max=8))
    point = PointData(run_id="r1", selector="ss-c1-<lab>", scenario=common_pb2.SCENARIO_SINGLE_STREAM, clients=1,
                      network_profile="lab & co", target_qps=0, state=common_pb2.RUN_STATE_SUCCEEDED,
                      repeats=[RepeatData(repeat=1, aggregate=result, clients={0: result})])
    data = ReportData(experiment=controller_pb2.Experiment(experiment_id="by-hand", error="<script>x</script>"),
                      points=[point])
    (tmp_path / TELEMETRY).write_bytes(b"stale")  # from an earlier report of this folder
    drawn = render_figures(data, tmp_path)
    assert [p.name for p in drawn] == [LATENCY_VS_CLIENTS, QPS_VS_CLIENTS, LATENCY_CDF]
    for path in drawn:
        assert_png_has_content(path)
    assert not (tmp_path / TELEMETRY).exists() and not (tmp_path / CLIENT_FAIRNESS).exists()
    page = report_html(data, [p.name for p in drawn])
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "ss-c1-&lt;lab&gt;" in page and "lab &amp; co" in page and "&lt;b&gt;too few" in page
    assert "INVALID (0/1 valid)" in page
    assert f'<img src="{TELEMETRY}"' not in page and "no telemetry was recorded" in page


def test_a_large_hand_made_sweep_with_gpus_and_two_nodes_draws_every_figure(tmp_path: Path) -> None:
    """What the loopback experiment cannot give: several profiles, four clients, a peak-search
    probe, GPUs and two nodes in the telemetry, a profile three hundred times slower."""
    rng = np.random.default_rng(7)
    points: list[PointData] = []
    start = 1_700_000_000
    for scenario, qps in ((common_pb2.SCENARIO_SINGLE_STREAM, 0.0), (common_pb2.SCENARIO_SERVER, 800.0)):
        for profile, base_ms in (("unshaped", 2.0), ("satellite", 600.0)):
            for clients in (1, 2, 4):
                point = PointData(run_id=f"run-{len(points)}", selector=f"p{len(points)}-c{clients}-{profile}",
                                  scenario=scenario, clients=clients, network_profile=profile, target_qps=qps,
                                  state=common_pb2.RUN_STATE_SUCCEEDED)
                for repeat in (1, 2):
                    latencies = {c: (rng.lognormal(np.log(base_ms * 1e6), 0.3, 500)).astype(np.int64)
                                 for c in range(clients)}
                    per_client = {c: common_pb2.TestResult(samples_per_second=100 + 10 * c + repeat,
                                                           latency=stats_ms(p50=base_ms, p99=base_ms * 2, max=base_ms * 3))
                                  for c in range(clients)}
                    aggregate = common_pb2.TestResult(
                        valid=True, samples_per_second=sum(r.samples_per_second for r in per_client.values()),
                        latency=stats_ms(min=base_ms / 2, p50=base_ms * clients, p90=base_ms * 1.5 * clients,
                                         p95=base_ms * 1.6 * clients, p97=base_ms * 1.7 * clients,
                                         p99=base_ms * 2 * clients, p999=base_ms * 2.5 * clients,
                                         max=base_ms * 3 * clients))
                    telemetry = []
                    for tick in range(5):
                        for node in ("edge", "client"):
                            sample = common_pb2.TelemetrySample(node=node, cpu_percent=float(rng.uniform(0, 100)),
                                                                memory_used_bytes=2**30 * (3 + tick),
                                                                memory_total_bytes=2**34)
                            sample.time.FromSeconds(start)
                            sample.time.nanos = tick * 200_000_000
                            if node == "edge":
                                sample.gpus.add(index=0, utilization_percent=float(rng.uniform(0, 100)))
                            telemetry.append(sample)
                    start += 2
                    point.repeats.append(RepeatData(repeat=repeat, aggregate=aggregate, clients=per_client,
                                                    sample_latencies=latencies if clients > 1 else {},
                                                    telemetry=telemetry))
                points.append(point)
    points[-1].peak_probe = True
    data = ReportData(experiment=controller_pb2.Experiment(experiment_id="by-hand-large"), points=points)
    page = write_report(data, tmp_path).read_text(encoding="utf-8")
    for name in ALL_FIGURES:
        assert_png_has_content(tmp_path / name)
        assert f'<img src="{name}"' in page
    assert "(peak search)" in page and page.count("<tr>") == 1 + len(points)
