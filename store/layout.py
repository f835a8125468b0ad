"""Object layout of the results bucket: `{experiment}/{selector}/{run}/repeat-{k}/`, and each
experiment's index at `{experiment}/manifest.json`."""

from __future__ import annotations

import re

from mecbench.core.errors import InvalidArgument

_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=+-]{0,127}$")

CONTENT_TYPES = {
    ".json": "application/json",
    ".txt": "text/plain; charset=utf-8",
    ".csv": "text/csv; charset=utf-8",
    ".log": "text/plain; charset=utf-8",
    ".conf": "text/plain; charset=utf-8",
    ".png": "image/png",
    ".html": "text/html; charset=utf-8",
    ".tar": "application/x-tar",
    ".npy": "application/x-npy",
}
# Per-client LoadGen latencies of every sample, int64 rows of (query sequence, latency ns),
# written by the LoadGen agent and pooled by the controller for merged percentiles.
SAMPLE_LATENCIES_NAME = "sample_latencies.npy"
# The direct LLM client's per-request records (JSONL and CSV, as AIPerf's profile_export), and
# each sample's token latencies, int64 rows of (issue ns, TTFT ns or -1, e2e ns, output tokens,
# failed 0/1), for pooled TTFT/TPOT over clients.
LLM_RECORDS_JSONL_NAME = "llm_requests.jsonl"
LLM_RECORDS_CSV_NAME = "llm_requests.csv"
TOKEN_LATENCIES_NAME = "token_latencies.npy"
# LoadGen's accuracy log, kept as produced, and MECBench's score of it.
ACCURACY_LOG_NAME = "mlperf_log_accuracy.json"
ACCURACY_SCORE_NAME = "accuracy.json"


def content_type_for(name: str) -> str:
    for suffix, kind in CONTENT_TYPES.items():
        if name.endswith(suffix):
            return kind
    return "application/octet-stream"


def check_segment(value: str, field: str) -> str:
    """A path segment must be a plain name: no slashes, no dot-dot, no spaces."""
    if not _SEGMENT.match(value) or value in {".", ".."}:
        raise InvalidArgument(
            "must be 1-128 characters of letters, digits and ._=+- and start with a letter or digit",
            field=field,
        )
    return value


def repeat_prefix(experiment: str, selector: str, run: str, repeat: int) -> str:
    return f"{experiment}/{selector}/{run}/repeat-{repeat}/"


def run_prefix(experiment: str, selector: str, run: str) -> str:
    return f"{experiment}/{selector}/{run}/"


MANIFEST_NAME = "manifest.json"


def experiment_manifest_key(experiment: str) -> str:
    return f"{experiment}/{MANIFEST_NAME}"
