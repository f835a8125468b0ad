"""Scoring accuracy runs: LoadGen's mlperf_log_accuracy.json of each client against the
labels an AccuracySpec names, with a registered scorer (mecbench.core.accuracy)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

from mecbench.core.accuracy import create_scorer, load_labels, parse_accuracy_log
from mecbench.core.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied, Violations
from mecbench.v1 import common_pb2
from store.base import ObjectStore, ObjectTooLarge
from store.local_files import read_allowed
from store.uris import is_s3, object_uri_problem, s3_location

LABELS_FIELD = "accuracy.labels_uri"
LABELS_ROOTS_SETTING = "MECBENCH_CONTROLLER_LABELS_ROOTS"
ACCURACY_MODES = (common_pb2.TEST_MODE_ACCURACY_ONLY, common_pb2.TEST_MODE_SUBMISSION_RUN)
MAX_LABELS_BYTES = 512 * 1024 * 1024


def validate_accuracy(spec: common_pb2.AccuracySpec, prefix: str, violations: Violations) -> None:
    # Building the scorer is the check: an unknown name or bad options are its InvalidArgument.
    try:
        create_scorer(spec.scorer, dict(spec.options), prefix)
    except InvalidArgument as exc:
        violations.extend(exc.violations)
    problem = object_uri_problem(spec.labels_uri, "the controller's machine")
    if problem is not None:
        violations.add(f"{prefix}.labels_uri", problem)
    digest = spec.labels_sha256.strip().lower()
    if digest and (len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest)):
        violations.add(f"{prefix}.labels_sha256", "must be 64 hex digits")


def read_labels(spec: common_pb2.AccuracySpec, store: ObjectStore, local_roots: Sequence[Path] = ()) -> bytes:
    """The labels object, checked against `labels_sha256` when set. A local path is read only
    under `local_roots` (the operator's MECBENCH_CONTROLLER_LABELS_ROOTS), and no more than
    MAX_LABELS_BYTES of anything."""
    uri = spec.labels_uri
    try:
        if is_s3(uri):
            bucket, key = s3_location(uri)
            content = store.get(bucket, key, max_bytes=MAX_LABELS_BYTES)
        else:
            content = read_allowed(uri, local_roots, MAX_LABELS_BYTES, field=LABELS_FIELD, setting=LABELS_ROOTS_SETTING)
    except ObjectTooLarge:
        raise FailedPrecondition(f"the labels at {uri} are larger than {MAX_LABELS_BYTES} bytes") from None
    except NotFound:
        raise FailedPrecondition(f"no labels at {uri}") from None
    except (InvalidArgument, PermissionDenied) as exc:
        raise FailedPrecondition(f"cannot read the labels at {uri}: {exc}") from None
    expected = spec.labels_sha256.strip().lower()
    if expected:
        digest = hashlib.sha256(content).hexdigest()
        if digest != expected:
            raise FailedPrecondition(f"the labels at {uri} have SHA-256 {digest}, expected {expected}")
    return content


def score_clients(spec: common_pb2.AccuracySpec, logs: list[bytes], labels_content: bytes) -> list[dict[str, float]]:
    """Each client's metrics: every client runs the whole accuracy set, so each is scored alone."""
    scorer = create_scorer(spec.scorer, dict(spec.options))
    labels = load_labels(labels_content)
    return [scorer.score(parse_accuracy_log(log), labels) for log in logs]


def apply_accuracy(
    aggregate: common_pb2.TestResult, results: list[common_pb2.TestResult], scores: list[dict[str, float]],
    scorer: str,
) -> None:
    """Per-client metrics into each result, their mean over clients into the aggregate."""
    for result, metrics in zip(results, scores, strict=True):
        result.accuracy.update(metrics)
        result.accuracy_scorer = scorer
    if scores:
        for name in scores[0]:
            aggregate.accuracy[name] = sum(metrics.get(name, 0.0) for metrics in scores) / len(scores)
        aggregate.accuracy_scorer = scorer
