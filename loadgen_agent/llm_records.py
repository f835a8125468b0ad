"""Per-request records of the direct client path and the LLM serving figures users expect.

Each request of a test leaves one record: when it was issued, when its first text arrived, when
each later text arrived, when it ended, its output tokens, and its failure kind if it failed.
From them: TTFT, TPOT ((e2e - TTFT) / (tokens - 1)), the inter-token latency distribution (the
gaps between text events), end-to-end latency, output tokens per second per request and in
total, goodput under SLOs (TTFT <= x and TPOT <= y) and errors by kind. The records are exported
beside LoadGen's logs as JSONL and CSV (as AIPerf's `profile_export` records are), and each
sample's token latencies as an int64 .npy (rows: issue ns, TTFT ns, e2e ns, output tokens,
failed) for pooling over clients.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from store.layout import LLM_RECORDS_CSV_NAME, LLM_RECORDS_JSONL_NAME, TOKEN_LATENCIES_NAME

_PERCENTILES = (("p50", 50.0), ("p90", 90.0), ("p99", 99.0))


@dataclass
class RequestRecord:
    sample_index: int
    # When LoadGen issued the sample, and when the request went out (later only when the client
    # holds it back: concurrency mode). The timings below count from the sending, as a client
    # measures them; LoadGen's own latencies count from the issue.
    issued_ns: int
    sent_ns: int = 0
    first_token_ns: int = 0
    # Arrival of every text event after the first (ITL = gaps between events).
    later_tokens_ns: list[int] = field(default_factory=list)
    ended_ns: int = 0
    output_tokens: int = 0
    # Prompt tokens as the server counted them (0: it did not say).
    input_tokens: int = 0
    error_kind: str = ""
    error: str = ""
    # Bytes of the answer's body as the client read it (decoded of chunked framing).
    response_bytes: int = 0
    # The load ramp's stage the request was sent in (-1: no ramp).
    stage: int = -1

    @property
    def ok(self) -> bool:
        return not self.error_kind

    @property
    def start_ns(self) -> int:
        return self.sent_ns or self.issued_ns

    @property
    def ttft_s(self) -> float:
        return (self.first_token_ns - self.start_ns) / 1e9 if self.first_token_ns else 0.0

    @property
    def e2e_s(self) -> float:
        return (self.ended_ns - self.start_ns) / 1e9

    @property
    def tpot_s(self) -> float:
        """Time per output token after the first; 0 for fewer than 2 tokens."""
        if self.output_tokens < 2 or not self.first_token_ns:
            return 0.0
        return (self.ended_ns - self.first_token_ns) / 1e9 / (self.output_tokens - 1)

    def itl_s(self) -> list[float]:
        times = [self.first_token_ns, *self.later_tokens_ns] if self.first_token_ns else []
        return [(b - a) / 1e9 for a, b in itertools.pairwise(times)]

    def as_dict(self, origin_ns: int) -> dict[str, object]:
        itl = self.itl_s()
        return {
            "sample_index": self.sample_index,
            "start_s": round((self.start_ns - origin_ns) / 1e9, 9),
            "queued_s": round((self.start_ns - self.issued_ns) / 1e9, 9),
            "ok": self.ok,
            "ttft_s": round(self.ttft_s, 9),
            "tpot_s": round(self.tpot_s, 9),
            "e2e_s": round(self.e2e_s, 9),
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "output_tokens_per_s": round(self.output_tokens / self.e2e_s, 3) if self.e2e_s > 0 else 0.0,
            "itl_mean_s": round(float(np.mean(itl)), 9) if itl else 0.0,
            "response_bytes": self.response_bytes,
            "error_kind": self.error_kind,
            "error": self.error,
        } | ({"stage": self.stage} if self.stage >= 0 else {})


def _spread(prefix: str, values: Sequence[float], metrics: dict[str, float]) -> None:
    if not values:
        return
    array = np.asarray(values, dtype=np.float64)
    metrics[f"{prefix}_mean_s"] = float(array.mean())
    for name, percent in _PERCENTILES:
        metrics[f"{prefix}_{name}_s"] = float(np.percentile(array, percent))


def compute_metrics(
    records: Sequence[RequestRecord], ttft_slo_s: float = 0.0, tpot_slo_s: float = 0.0
) -> dict[str, float]:
    """The figures over a test's records; an SLO of 0 is no bound. Rates are over the span from
    the first issue to the last end."""
    metrics: dict[str, float] = {}
    ok = [r for r in records if r.ok]
    metrics["requests_ok"] = float(len(ok))
    metrics["requests_failed"] = float(len(records) - len(ok))
    if not records:
        return metrics
    span_s = (max(r.ended_ns for r in records) - min(r.start_ns for r in records)) / 1e9
    _spread("ttft", [r.ttft_s for r in ok], metrics)
    _spread("tpot", [r.tpot_s for r in ok if r.output_tokens >= 2], metrics)
    _spread("e2e", [r.e2e_s for r in ok], metrics)
    _spread("itl", [gap for r in ok for gap in r.itl_s()], metrics)
    tokens = sum(r.output_tokens for r in ok)
    metrics["output_tokens"] = float(tokens)
    counted = [r.input_tokens for r in ok if r.input_tokens]
    if counted:
        metrics["input_tokens"] = float(sum(counted))
        metrics["input_tokens_mean"] = float(np.mean(counted))
    if ok:
        metrics["output_tokens_mean"] = tokens / len(ok)
    per_request = [r.output_tokens / r.e2e_s for r in ok if r.e2e_s > 0]
    if per_request:
        metrics["output_tokens_per_s_per_request_p50"] = float(np.median(per_request))
    good = [
        r for r in ok
        if (not ttft_slo_s or r.ttft_s <= ttft_slo_s) and (not tpot_slo_s or r.tpot_s <= tpot_slo_s)
    ]
    metrics["goodput_requests"] = float(len(good))
    metrics["goodput_fraction"] = len(good) / len(records)
    if span_s > 0:
        metrics["requests_per_s"] = len(ok) / span_s
        metrics["output_tokens_per_s"] = tokens / span_s
        metrics["goodput_requests_per_s"] = len(good) / span_s
        metrics["goodput_output_tokens_per_s"] = sum(r.output_tokens for r in good) / span_s
    return metrics


@dataclass
class StageSpan:
    """One stage of a load ramp as asked (a rate or a concurrency, for a duration) and as it ran:
    its span on the monotonic clock (0 until it ran)."""

    rate: float
    concurrency: int
    duration_ns: int
    start_ns: int = 0
    end_ns: int = 0


def compute_stage_metrics(records: Sequence[RequestRecord], stages: Sequence[StageSpan]) -> dict[str, float]:
    """Each ramp stage's figures from the records of the requests sent in it: `stage<i>_` +
    target_rate_per_s or target_concurrency (as asked), duration_s (as it ran), sent, failed,
    requests_per_s (sent over the stage's span: the achieved rate), concurrency_mean (requests in
    flight, averaged over the span), ttft/e2e p50 and p90."""
    metrics: dict[str, float] = {}
    by_stage: dict[int, list[RequestRecord]] = {}
    for record in records:
        by_stage.setdefault(record.stage, []).append(record)
    for index, stage in enumerate(stages):
        prefix = f"stage{index}"
        if stage.rate:
            metrics[f"{prefix}_target_rate_per_s"] = stage.rate
        else:
            metrics[f"{prefix}_target_concurrency"] = float(stage.concurrency)
        span_ns = stage.end_ns - stage.start_ns
        metrics[f"{prefix}_duration_s"] = span_ns / 1e9
        sent = by_stage.get(index, [])
        ok = [r for r in sent if r.ok]
        metrics[f"{prefix}_sent"] = float(len(sent))
        metrics[f"{prefix}_failed"] = float(len(sent) - len(ok))
        if span_ns <= 0:
            continue
        metrics[f"{prefix}_requests_per_s"] = len(sent) / (span_ns / 1e9)
        # Time in flight within the span, summed over every request of the test (a stage's
        # concurrency includes requests still running from the stage before).
        busy_ns = sum(
            max(0, min(r.ended_ns or stage.end_ns, stage.end_ns) - max(r.start_ns, stage.start_ns)) for r in records
        )
        metrics[f"{prefix}_concurrency_mean"] = busy_ns / span_ns
        for name, values in (("ttft", [r.ttft_s for r in ok if r.first_token_ns]), ("e2e", [r.e2e_s for r in ok])):
            if values:
                metrics[f"{prefix}_{name}_p50_s"] = float(np.percentile(values, 50))
                metrics[f"{prefix}_{name}_p90_s"] = float(np.percentile(values, 90))
    return metrics


def write_records(records: Sequence[RequestRecord], directory: Path) -> None:
    """JSONL and CSV records, and the token latencies .npy, into `directory`."""
    if not records:
        return
    origin = min(r.start_ns for r in records)
    rows = [r.as_dict(origin) for r in sorted(records, key=lambda r: r.start_ns)]
    with (directory / LLM_RECORDS_JSONL_NAME).open("w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    (directory / LLM_RECORDS_CSV_NAME).write_text(text.getvalue())
    write_token_latencies(
        [
            (r.issued_ns, r.first_token_ns - r.issued_ns if r.first_token_ns else -1, r.ended_ns - r.issued_ns,
             r.output_tokens, 0 if r.ok else 1)
            for r in records
        ],
        directory,
    )


def write_token_latencies(rows: Sequence[tuple[int, int, int, int, int]], directory: Path) -> None:
    """Each sample's (issue ns, TTFT ns or -1, latency ns, output tokens, failed 0/1) as int64 .npy
    (relay and direct paths alike), for TTFT/TPOT pooled over clients."""
    array = np.array(rows, dtype=np.int64).reshape(-1, 5)
    with (directory / TOKEN_LATENCIES_NAME).open("wb") as handle:
        np.save(handle, array)
