"""Plain-Python pieces of the SUT agent: histogram buckets, settings, the lifecycle without gRPC."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from mecbench.core.errors import InvalidArgument
from mecbench.core.sut_config import validate_config
from mecbench.v1 import common_pb2, sut_agent_pb2
from sut_agent.backends import BACKENDS
from sut_agent.backends.base import Completion
from sut_agent.lifecycle import BackendManager
from sut_agent.settings import SutAgentSettings
from sut_agent.stats import BUCKET_COUNT, Histogram, bucket_index, bucket_indices, bucket_lower_us, bucket_upper_us
from tests.sut_agent.conftest import synthetic


def test_buckets_are_contiguous_and_narrow() -> None:
    for index in range(BUCKET_COUNT - 1):
        assert bucket_upper_us(index) == bucket_lower_us(index + 1)
        width = bucket_upper_us(index) - bucket_lower_us(index)
        assert width == 1 or width / bucket_lower_us(index) <= 1 / 16
    values = [0, 1, 15, 16, 31, 32, 33, 1000, 2047, 2048, 123_456, 2**32 - 1]
    for value in values:
        index = bucket_index(value)
        assert bucket_lower_us(index) <= value < bucket_upper_us(index)
    # The numpy path agrees with the scalar one.
    assert bucket_indices(np.array(values)).tolist() == [bucket_index(v) for v in values]


def test_histogram_percentiles() -> None:
    histogram = Histogram()
    histogram.record(list(range(1, 1001)))  # 1..1000 us, numpy path
    histogram.record([5000])  # scalar path
    assert histogram.count == 1001 and histogram.max_us == 5000 and histogram.min_us == 1
    assert 500 <= histogram.percentile_us(0.5) <= 500 * 1.07
    assert 990 <= histogram.percentile_us(0.99) <= 990 * 1.07
    assert histogram.percentile_us(1.0) == 5000


def test_settings_come_from_the_environment() -> None:
    settings = SutAgentSettings.load()
    assert settings.max_workers >= 64
    from mecbench.core.settings import from_env

    loaded = from_env(
        SutAgentSettings, "MECBENCH_SUT_", {"MECBENCH_SUT_MODEL_DIR": "/models", "MECBENCH_SUT_MAX_WORKERS": "9"}
    )
    assert loaded.model_dir == Path("/models") and loaded.max_workers == 9


def test_registry_names_the_built_in_backends() -> None:
    assert set(BACKENDS) == {"synthetic", "onnxruntime", "external"}


def test_validation_reports_everything_at_once() -> None:
    config = sut_agent_pb2.SutConfig(
        onnxruntime=sut_agent_pb2.OnnxRuntimeBackendConfig(sample_shape=[0, 3], data_type=common_pb2.DATA_TYPE_BYTES)
    )
    fields = [v.field for v in validate_config(config).items]
    assert fields == [
        "config.onnxruntime.model_path",
        "config.onnxruntime.sample_shape",
        "config.onnxruntime.data_type",
    ]
    unspecified = synthetic(0.001, distribution=sut_agent_pb2.SERVICE_TIME_DISTRIBUTION_UNSPECIFIED)
    assert not validate_config(unspecified)  # served as CONSTANT


def test_relative_model_paths_resolve_in_the_model_dir(tmp_path: Path) -> None:
    manager = BackendManager(SutAgentSettings(model_dir=tmp_path))
    config = sut_agent_pb2.SutConfig(onnxruntime=sut_agent_pb2.OnnxRuntimeBackendConfig(model_path="missing.onnx"))
    with pytest.raises(InvalidArgument) as info:
        manager.start(config, restart=False)
    assert str(tmp_path / "missing.onnx") in str(info.value)
    assert manager.backend is None


def test_zero_time_completes_inside_submit() -> None:
    manager = BackendManager(SutAgentSettings())
    manager.start(synthetic(0.0, max_batch_size=4), restart=False)
    backend = manager.ready_backend()
    got: list[Completion] = []
    backend.submit([1, 2, 3, 4, 5], [], [], got.append)
    assert len(got) == 1 and got[0].sample_ids == [1, 2, 3, 4, 5] and got[0].batches == 2
    manager.stop()


def test_completions_are_delivered_once_per_callback_per_wake() -> None:
    manager = BackendManager(SutAgentSettings())
    manager.start(synthetic(0.002), restart=False)
    backend = manager.ready_backend()
    got: list[Completion] = []
    done = threading.Event()

    def on_done(completion: Completion) -> None:
        got.append(completion)
        done.set()

    backend.submit(list(range(100)), [], [], on_done)
    assert done.wait(5)
    manager.stop()
    assert sum(len(c) for c in got) == 100 and len(got) == 1
