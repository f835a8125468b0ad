"""Accuracy scoring of LoadGen's `mlperf_log_accuracy.json`, as MLPerf's per-task accuracy scripts do.

An AccuracyOnly run makes LoadGen log every response it was given: a JSON list of
`{"seq_id", "qsl_idx", "data": HEX of the response bytes}` records. A scorer decodes each response
and compares it with the ground-truth label of the dataset sample it answers (labels are indexed by
qsl_idx, the sample's index in the dataset). Scorers are classes; plugins add theirs through the
`mecbench.accuracy_scorers` entry-point group.

Duplicates: LoadGen may log one sample several times (performance runs with accuracy sampling).
Like MLPerf's scripts (accuracy-imagenet.py `seen` set), a sample is scored once, from the first
record logged for it; later records of the same qsl_idx are ignored.
"""

from __future__ import annotations

import io
import json
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from mecbench.core.errors import FieldViolation, InvalidArgument, Violations
from mecbench.core.logging import get_logger

_log = get_logger("mecbench.accuracy")

SCORER_ENTRY_POINT_GROUP = "mecbench.accuracy_scorers"

# How many offending qsl_idx values an error message lists before it summarises the rest.
_MAX_LISTED = 10


@dataclass(frozen=True)
class AccuracyRecord:
    """One response LoadGen logged: the dataset index it answers and the raw response bytes."""

    qsl_idx: int
    data: bytes


def parse_accuracy_log(content: bytes) -> list[AccuracyRecord]:
    """The records of a `mlperf_log_accuracy.json`, in the order LoadGen logged them.

    An empty file (a run that logged nothing) gives no records. A log that lacks only its closing
    bracket (LoadGen writes it at the end of the test, so a crash leaves it off) is read with a
    warning; anything else that is not a JSON list of records is a ValueError.
    """
    try:
        text = content.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"accuracy log is not UTF-8 text: {exc}") from exc
    if not text.strip():
        return []
    try:
        parsed: object = json.loads(text)
    except json.JSONDecodeError as exc:
        parsed = _without_closing_bracket(text)
        if parsed is None:
            raise ValueError(f"accuracy log is not valid JSON: {exc}") from exc
        _log.warning("accuracy log lacks its closing bracket; the run may have crashed", records=len(parsed))
    if not isinstance(parsed, list):
        raise ValueError(f"accuracy log must be a JSON list of records, not {type(parsed).__name__}")
    return [_record(i, item) for i, item in enumerate(parsed)]


def _without_closing_bracket(text: str) -> list[object] | None:
    """The records of a log cut off after a whole record, or None when it is broken elsewhere.

    A record cut in the middle is not recovered: its data would be a guess.
    """
    body = text.rstrip().rstrip(",")
    if not body.startswith("[") or body.endswith("]"):
        return None
    try:
        parsed: object = json.loads(body + "\n]")
    except json.JSONDecodeError:
        return None
    return parsed if isinstance(parsed, list) else None


def _record(position: int, item: object) -> AccuracyRecord:
    where = f"accuracy log record {position}"
    if not isinstance(item, dict):
        raise ValueError(f"{where} must be an object, not {type(item).__name__}")
    qsl_idx = item.get("qsl_idx")
    # bool is an int subclass; `true` is never an index.
    if not isinstance(qsl_idx, int) or isinstance(qsl_idx, bool) or qsl_idx < 0:
        raise ValueError(f"{where}: qsl_idx must be a non-negative integer, not {qsl_idx!r}")
    data = item.get("data")
    if not isinstance(data, str):
        raise ValueError(f"{where} (qsl_idx {qsl_idx}): data must be a hex string, not {type(data).__name__}")
    try:
        raw = bytes.fromhex(data)
    except ValueError as exc:
        raise ValueError(f"{where} (qsl_idx {qsl_idx}): data is not hex: {exc}") from exc
    return AccuracyRecord(qsl_idx=qsl_idx, data=raw)


class Labels:
    """Ground truth indexed by qsl_idx: numbers (a 1-D numpy array) or text (a tuple of str).

    Indexing checks the range itself, so a negative qsl_idx never wraps around as numpy would.
    """

    __slots__ = ("_values",)

    def __init__(self, values: npt.NDArray[Any] | Sequence[str]) -> None:
        if isinstance(values, np.ndarray):
            if values.ndim != 1:
                raise ValueError(f"labels must be one-dimensional, not of shape {values.shape}")
            if values.dtype.kind == "U":
                self._values: npt.NDArray[Any] | tuple[str, ...] = tuple(str(v) for v in values)
            elif values.dtype.kind in "iuf":
                self._values = values
            else:
                raise ValueError(f"labels must be numbers or strings, not numpy dtype {values.dtype}")
        else:
            if not all(isinstance(v, str) for v in values):
                raise ValueError("text labels must all be strings")
            self._values = tuple(values)

    @property
    def is_text(self) -> bool:
        return isinstance(self._values, tuple)

    @property
    def values(self) -> npt.NDArray[Any] | tuple[str, ...]:
        """The labels themselves, for scorers that work on them as a whole."""
        return self._values

    def __len__(self) -> int:
        return len(self._values)

    def __getitem__(self, qsl_idx: int) -> int | float | str:
        if not 0 <= qsl_idx < len(self._values):
            raise IndexError(f"qsl_idx {qsl_idx} is outside the {len(self._values)} labels")
        value = self._values[qsl_idx]
        if isinstance(value, str):
            return value
        item: int | float = value.item()
        return item

    def __iter__(self) -> Iterator[int | float | str]:
        return (self[i] for i in range(len(self)))

    def __repr__(self) -> str:
        values = self._values
        kind = "text" if isinstance(values, tuple) else f"numeric {values.dtype}"
        return f"Labels({len(values)} {kind})"


_NPY_MAGIC = b"\x93NUMPY"


def load_labels(content: bytes) -> Labels:
    """Labels from a `.npy` file (1-D, numbers or unicode strings) or a JSON list of numbers or strings."""
    if content.startswith(_NPY_MAGIC):
        try:
            array = np.load(io.BytesIO(content), allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise ValueError(f"labels are not a readable .npy file: {exc}") from exc
        return Labels(array)
    try:
        parsed: object = json.loads(content.decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError("labels must be a .npy file or a JSON list of numbers or strings") from exc
    if not isinstance(parsed, list):
        raise ValueError(f"JSON labels must be a list of numbers or strings, not {type(parsed).__name__}")
    if all(isinstance(v, str) for v in parsed):
        return Labels([str(v) for v in parsed])
    for i, v in enumerate(parsed):
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise ValueError(f"JSON labels must be all numbers or all strings; item {i} is {v!r}")
    dtype = np.int64 if all(isinstance(v, int) for v in parsed) else np.float64
    try:
        return Labels(np.asarray(parsed, dtype=dtype))
    except OverflowError as exc:
        raise ValueError(f"JSON labels do not fit in int64: {exc}") from exc


def first_per_sample(records: Sequence[AccuracyRecord], labels: Labels) -> tuple[dict[int, bytes], dict[str, float]]:
    """The response of each sample (its first record, as MLPerf's scripts keep) and the counts
    every scorer reports: `samples` (records logged) and `distinct_samples` (samples scored).

    Raises ValueError when there is nothing to score or a record answers a sample beyond the
    labels: a score over the wrong dataset, or none at all, must not pass for a result.
    """
    if not records:
        raise ValueError("the accuracy log holds no records to score; was the run in AccuracyOnly mode?")
    responses: dict[int, bytes] = {}
    for record in records:
        responses.setdefault(record.qsl_idx, record.data)
    beyond = sorted(i for i in responses if i >= len(labels))
    if beyond:
        listed = ", ".join(str(i) for i in beyond[:_MAX_LISTED])
        more = f" and {len(beyond) - _MAX_LISTED} more" if len(beyond) > _MAX_LISTED else ""
        raise ValueError(
            f"qsl_idx {listed}{more} beyond the {len(labels)} labels; are the labels those of the run's dataset?"
        )
    counts = {"samples": float(len(records)), "distinct_samples": float(len(responses))}
    return responses, counts


class Scorer(ABC):
    """Scores an accuracy log against labels; one subclass per task, built from string options.

    Subclasses list the options they take in `option_help` and read them in `configure`, adding a
    violation (field `options.<key>`) for each bad one; the caller prefixes the path to the
    scorer's place in the request. Unknown options are rejected here, so a typo is never ignored.
    """

    name: ClassVar[str]
    option_help: ClassVar[Mapping[str, str]] = {}

    def __init__(self, options: Mapping[str, str]) -> None:
        self.options: dict[str, str] = dict(options)
        violations = Violations()
        for key in sorted(self.options):
            if key not in self.option_help:
                known = ", ".join(sorted(self.option_help)) or "none"
                violations.add(f"options.{key}", f"unknown option of scorer {self.name!r} (it takes: {known})")
        self.configure(self.options, violations)
        violations.raise_if_any()

    def configure(self, options: Mapping[str, str], violations: Violations) -> None:  # noqa: B027
        """Read the options into attributes; add a violation for each bad one. (No options: no-op.)"""

    @abstractmethod
    def score(self, records: Sequence[AccuracyRecord], labels: Labels) -> dict[str, float]:
        """Metrics by name. Raises ValueError on records that cannot be scored against the labels."""


def _choice(options: Mapping[str, str], key: str, choices: Sequence[str], default: str, violations: Violations) -> str:
    value = options.get(key, default)
    if value not in choices:
        violations.add(f"options.{key}", f"must be one of {', '.join(choices)}, not {value!r}")
        return default
    return value


_INT_DTYPES = ("int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64")
# Quantised models return integer scores; some frameworks return the class index as a float.
_LOGIT_DTYPES = ("float16", "float32", "float64", *_INT_DTYPES)
_CLASS_DTYPES = (*_INT_DTYPES, "float32", "float64")


class TopOneScorer(Scorer):
    """Classification top-1 accuracy, as MLPerf's accuracy-imagenet.py.

    Each response is either the class scores or logits (argmax gives the class) or, with
    `output=class`, the class index itself, as one value. Labels are class indices.
    Metrics: `top1` (correct / distinct samples), `samples`, `distinct_samples`.
    """

    name = "top1"
    option_help = {
        "output": "what each response holds: logits (class scores; default) or class (the class index)",
        "dtype": "numpy dtype of the response values (default float32 for logits, int64 for class)",
    }

    def configure(self, options: Mapping[str, str], violations: Violations) -> None:
        self.output = _choice(options, "output", ("logits", "class"), "logits", violations)
        if self.output == "class":
            self.dtype = np.dtype(_choice(options, "dtype", _CLASS_DTYPES, "int64", violations))
        else:
            self.dtype = np.dtype(_choice(options, "dtype", _LOGIT_DTYPES, "float32", violations))

    def score(self, records: Sequence[AccuracyRecord], labels: Labels) -> dict[str, float]:
        # No labels at all reads as text; the range check then reports the real problem.
        if labels.is_text and len(labels):
            raise ValueError("top1 needs numeric class labels, not text")
        responses, counts = first_per_sample(records, labels)
        correct = 0
        for qsl_idx, data in responses.items():
            if self._predicted(qsl_idx, data) == _class_label(labels, qsl_idx):
                correct += 1
        return {"top1": correct / len(responses), **counts}

    def _predicted(self, qsl_idx: int, data: bytes) -> int:
        if not data or len(data) % self.dtype.itemsize:
            raise ValueError(
                f"qsl_idx {qsl_idx}: a response of {len(data)} bytes is not a whole number of {self.dtype} values"
            )
        values = np.frombuffer(data, dtype=self.dtype)
        if self.output == "logits":
            return int(np.argmax(values))
        # One value, not MLPerf's `data[0]`: a longer response means the dtype or the output mode
        # is wrong, and scoring its first value would report a meaningless accuracy.
        if values.size != 1:
            raise ValueError(
                f"qsl_idx {qsl_idx}: output=class expects one {self.dtype} value, the response holds {values.size}"
            )
        value: int | float = values[0].item()
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(f"qsl_idx {qsl_idx}: class index {value} is not a whole number")
        return int(value)


def _class_label(labels: Labels, qsl_idx: int) -> int:
    label = labels[qsl_idx]
    if isinstance(label, str) or (isinstance(label, float) and not label.is_integer()):
        raise ValueError(f"label of qsl_idx {qsl_idx} is {label!r}, not a class index")
    return int(label)


_WHITESPACE = re.compile(r"\s+")


class ExactMatchScorer(Scorer):
    """Text generation / QA: the response, decoded as UTF-8 and stripped, equals the text label.

    `normalize=lower` lowercases both and collapses runs of whitespace to one space; `prefix=true`
    also counts a response that starts with the label (a model that answers, then keeps talking).
    Metrics: `exact_match` (matches / distinct samples), `samples`, `distinct_samples`.
    """

    name = "exact_match"
    option_help = {
        "normalize": "none (default) or lower: lowercase and collapse whitespace before comparing",
        "prefix": "true: a response that starts with the label counts; false (default): it must equal it",
    }

    def configure(self, options: Mapping[str, str], violations: Violations) -> None:
        self.lower = _choice(options, "normalize", ("none", "lower"), "none", violations) == "lower"
        self.prefix = _choice(options, "prefix", ("true", "false"), "false", violations) == "true"

    def _normalized(self, text: str) -> str:
        text = text.strip()
        return _WHITESPACE.sub(" ", text.lower()) if self.lower else text

    def score(self, records: Sequence[AccuracyRecord], labels: Labels) -> dict[str, float]:
        if not labels.is_text and len(labels):
            raise ValueError("exact_match needs text labels (a JSON list of strings), not numbers")
        responses, counts = first_per_sample(records, labels)
        matches = 0
        for qsl_idx, data in responses.items():
            response = self._normalized(data.decode("utf-8", errors="replace"))
            label = self._normalized(str(labels[qsl_idx]))
            if response == label or (self.prefix and response.startswith(label)):
                matches += 1
        return {"exact_match": matches / len(responses), **counts}


_BUILTIN_SCORERS: dict[str, type[Scorer]] = {cls.name: cls for cls in (TopOneScorer, ExactMatchScorer)}


def available_scorers() -> dict[str, type[Scorer]]:
    """Scorers by name: the built-ins, then those plugins register under SCORER_ENTRY_POINT_GROUP.

    Read afresh on each call (no cache), so a package installed while a service runs is seen. A
    plugin that fails to load, is not a Scorer, or claims a name already taken is logged and
    skipped: one broken package must not take scoring down, nor silently replace a scorer.
    """
    scorers = dict(_BUILTIN_SCORERS)
    seen: dict[str, str] = {name: f"{cls.__module__}:{cls.__qualname__}" for name, cls in scorers.items()}
    for entry_point in metadata.entry_points(group=SCORER_ENTRY_POINT_GROUP):
        if entry_point.name in seen:
            # The same target found twice (the built-ins' own entry points, or one package on
            # sys.path twice) is no conflict.
            if seen[entry_point.name] != entry_point.value:
                _log.warning(
                    "accuracy scorer name already taken; plugin skipped",
                    scorer=entry_point.name,
                    entry_point=entry_point.value,
                    kept=seen[entry_point.name],
                )
            continue
        try:
            loaded = entry_point.load()
        except Exception as exc:  # noqa: BLE001 -- a plugin's import can fail in any way; never fatal
            _log.warning(
                "accuracy scorer plugin failed to load; skipped",
                scorer=entry_point.name,
                entry_point=entry_point.value,
                error=f"{type(exc).__name__}: {exc}",
            )
            continue
        if not (isinstance(loaded, type) and issubclass(loaded, Scorer)):
            _log.warning(
                "accuracy scorer plugin is not a Scorer subclass; skipped",
                scorer=entry_point.name,
                entry_point=entry_point.value,
            )
            continue
        scorers[entry_point.name] = loaded
        seen[entry_point.name] = entry_point.value
    return scorers


def create_scorer(name: str, options: Mapping[str, str], field: str = "accuracy") -> Scorer:
    """The scorer `name` built from `options`; InvalidArgument on an unknown name (`<field>.scorer`)
    or bad options (`<field>.options.<key>`)."""
    scorers = available_scorers()
    cls = scorers.get(name)
    if cls is None:
        raise InvalidArgument(
            f"unknown accuracy scorer {name!r}; available: {', '.join(sorted(scorers))}", field=f"{field}.scorer"
        )
    try:
        return cls(options)
    except InvalidArgument as exc:
        raise InvalidArgument(
            [FieldViolation(f"{field}.{v.field or 'options'}", v.description) for v in exc.violations]
        ) from exc
    except ValueError as exc:
        # A plugin that checks its options with plain ValueError still reports a client error.
        raise InvalidArgument(str(exc), field=f"{field}.options") from exc


def score_accuracy_log(log: bytes, labels: bytes, scorer: str, options: Mapping[str, str]) -> dict[str, float]:
    """Score a `mlperf_log_accuracy.json` against labels: InvalidArgument for a bad scorer or
    options (checked first, field `accuracy...`), ValueError for content that cannot be scored."""
    built = create_scorer(scorer, options)
    return built.score(parse_accuracy_log(log), load_labels(labels))
