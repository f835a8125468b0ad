"""The SUT agent's reading of a server's Prometheus page, as vLLM writes one: counters and
histogram series as increases since the last reset, gauges as read, against a real model server."""

from __future__ import annotations

import urllib3

from mecbench.servers.http import HttpClient
from mecbench.servers.metrics import ServerMetrics, parse_prometheus
from tests.external_servers import LM_NAME
from tests.llm.conftest import ModelServer

VLLM_PAGE = """# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="qwen"} 3.0
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{le="0.01",model_name="qwen"} 5.0
vllm:time_to_first_token_seconds_bucket{le="+Inf",model_name="qwen"} 9.0
vllm:time_to_first_token_seconds_count{model_name="qwen"} 9.0
vllm:time_to_first_token_seconds_sum{model_name="qwen"} 0.25
# TYPE vllm:prompt_tokens counter
vllm:prompt_tokens_total{model_name="qwen"} 1280.0
"""


def test_a_vllm_page_parses_into_series_and_kinds() -> None:
    series = parse_prometheus(VLLM_PAGE)
    assert series['vllm:num_requests_running{model_name="qwen"}'] == (3.0, False)
    assert series['vllm:time_to_first_token_seconds_bucket{le="0.01",model_name="qwen"}'] == (5.0, True)
    assert series['vllm:time_to_first_token_seconds_sum{model_name="qwen"}'] == (0.25, True)
    assert series['vllm:prompt_tokens_total{model_name="qwen"}'] == (1280.0, True)


def test_counters_count_from_the_last_reset(model_server: ModelServer) -> None:
    reader = ServerMetrics(HttpClient(model_server.endpoint, 5.0, 1), "/metrics")
    key = 'model_server_requests_total{path="/v1/completions"}'
    pool = urllib3.HTTPConnectionPool("127.0.0.1", model_server.http_port)

    def complete() -> None:
        body = b'{"model": "%s", "prompt": "The edge", "max_tokens": 2}' % LM_NAME.encode()
        assert (
            pool.urlopen("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"}).status
            == 200
        )

    complete()
    reader.read(reset=True)
    for _ in range(3):
        complete()
    assert reader.read()[key] == 3
    assert reader.read(reset=True)[key] == 3
    complete()
    assert reader.read()[key] == 1
    assert ServerMetrics(HttpClient(model_server.endpoint, 5.0, 1), "/no-metrics").read() == {}
