"""Accuracy scoring over logs that LoadGen itself wrote, and scorer plugins found through real
entry points."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import structlog.testing

from mecbench.core.accuracy import (
    SCORER_ENTRY_POINT_GROUP,
    AccuracyRecord,
    ExactMatchScorer,
    Labels,
    Scorer,
    TopOneScorer,
    available_scorers,
    create_scorer,
    load_labels,
    parse_accuracy_log,
    score_accuracy_log,
)
from mecbench.core.errors import InvalidArgument

SAMPLES = 40
CLASSES = 4
# Samples the fake model answers wrongly (it predicts the next class): 35 of 40 right.
WRONG = (3, 7, 8, 20, 33)

# LoadGen is a per-process singleton, so each test run gets its own child interpreter. The child
# answers each sample from a rule the test knows, so the exact accuracy is known in advance.
_CHILD = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import mlperf_loadgen as lg

    outdir, config = sys.argv[1], json.loads(sys.argv[2])
    wrong, kind, texts = set(config["wrong"]), config["kind"], config.get("texts", [])
    alive = []  # the response buffers must outlive QuerySamplesComplete

    def answer(index):
        if kind == "text":
            return np.frombuffer(texts[index].encode("utf-8"), dtype=np.uint8)
        cls = (index + 1) % 4 if index in wrong else index % 4
        if kind == "class":
            return np.array([cls], dtype=np.int64)
        logits = np.linspace(-1.0, 0.5, 4, dtype=np.float32)
        logits[cls] = 3.0
        return logits

    def issue(query_samples):
        responses = []
        for sample in query_samples:
            data = answer(sample.index)
            alive.append(data)
            responses.append(lg.QuerySampleResponse(sample.id, data.ctypes.data, data.nbytes))
        lg.QuerySamplesComplete(responses)

    sut = lg.ConstructSUT(issue, lambda: None)
    qsl = lg.ConstructQSL(config["count"], config["count"], lambda s: None, lambda s: None)
    settings = lg.TestSettings()
    settings.scenario = lg.TestScenario.Offline
    settings.mode = lg.TestMode.AccuracyOnly
    log_settings = lg.LogSettings()
    log_settings.log_output.outdir = outdir
    log_settings.enable_trace = False
    lg.StartTestWithLogSettings(sut, qsl, settings, log_settings)
    lg.DestroyQSL(qsl)
    lg.DestroySUT(sut)
    """
)


def loadgen_accuracy_log(tmp_path: Path, kind: str, count: int = SAMPLES, texts: list[str] | None = None) -> bytes:
    """Run a real LoadGen AccuracyOnly test in a child process; return its mlperf_log_accuracy.json."""
    outdir = tmp_path / f"loadgen-{kind}"
    outdir.mkdir()  # LoadGen does not create it
    config = {"kind": kind, "count": count, "wrong": list(WRONG), "texts": texts or []}
    subprocess.run(
        [sys.executable, "-c", _CHILD, str(outdir), json.dumps(config)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return (outdir / "mlperf_log_accuracy.json").read_bytes()


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


CLASS_LABELS = np.arange(SAMPLES, dtype=np.int64) % CLASSES


def test_top1_scores_a_real_loadgen_log(tmp_path: Path) -> None:
    log = loadgen_accuracy_log(tmp_path, "logits")

    records = parse_accuracy_log(log)
    assert sorted(r.qsl_idx for r in records) == list(range(SAMPLES))
    assert all(len(r.data) == CLASSES * 4 for r in records)  # four float32 logits each

    metrics = score_accuracy_log(log, npy_bytes(CLASS_LABELS), "top1", {})
    assert metrics == {"top1": (SAMPLES - len(WRONG)) / SAMPLES, "samples": SAMPLES, "distinct_samples": SAMPLES}
    assert metrics["top1"] == 0.875
    # The same labels as a JSON list, and an explicit dtype, score the same.
    same = score_accuracy_log(log, json.dumps(CLASS_LABELS.tolist()).encode(), "top1", {"dtype": "float32"})
    assert same["top1"] == 0.875


def test_top1_with_class_index_responses(tmp_path: Path) -> None:
    log = loadgen_accuracy_log(tmp_path, "class")
    labels = json.dumps(CLASS_LABELS.tolist()).encode()

    assert score_accuracy_log(log, labels, "top1", {"output": "class"})["top1"] == 0.875
    assert score_accuracy_log(log, labels, "top1", {"output": "class", "dtype": "int64"})["top1"] == 0.875
    # int64 responses read as int32 hold two values each: a wrong dtype is an error, not a score.
    with pytest.raises(ValueError, match="expects one int32 value"):
        score_accuracy_log(log, labels, "top1", {"output": "class", "dtype": "int32"})
    # Nothing in the bytes tells the modes apart, so the option matters: read as float32 logits,
    # a little-endian int64 class is a tiny or zero float then a zero, and argmax is always 0.
    as_logits = score_accuracy_log(log, labels, "top1", {})
    assert as_logits["top1"] == np.count_nonzero(CLASS_LABELS == 0) / SAMPLES


def test_exact_match_over_real_text_responses(tmp_path: Path) -> None:
    labels = [f"the answer is {i}" for i in range(SAMPLES)]
    # Exact for even samples; case and spacing differ for odd ones; sample 5 keeps talking;
    # samples in WRONG answer another number.
    texts = []
    for i, label in enumerate(labels):
        text = label if i % 2 == 0 else f"  The  Answer\tis {i}\n"
        if i == 5:
            text = f"The answer is {i}. Because reasons."
        if i in WRONG:
            text = f"the answer is {i + 100}"
        texts.append(text)
    log = loadgen_accuracy_log(tmp_path, "text", texts=texts)
    label_bytes = json.dumps(labels).encode()

    exact = [i for i in range(SAMPLES) if i % 2 == 0 and i not in WRONG]
    normalized = [i for i in range(SAMPLES) if i != 5 and i not in WRONG]
    prefixed = [*normalized, 5]

    assert score_accuracy_log(log, label_bytes, "exact_match", {}) == {
        "exact_match": len(exact) / SAMPLES,
        "samples": SAMPLES,
        "distinct_samples": SAMPLES,
    }
    assert score_accuracy_log(log, label_bytes, "exact_match", {"normalize": "lower"})["exact_match"] == (
        len(normalized) / SAMPLES
    )
    both = {"normalize": "lower", "prefix": "true"}
    assert score_accuracy_log(log, label_bytes, "exact_match", both)["exact_match"] == len(prefixed) / SAMPLES


def test_exact_match_decodes_invalid_utf8_with_replacement() -> None:
    records = [AccuracyRecord(0, b"caf\xc3\xa9"), AccuracyRecord(1, b"\xff\xfe ok")]
    labels = load_labels(json.dumps(["café", "\ufffd\ufffd ok"]).encode())
    assert ExactMatchScorer({}).score(records, labels)["exact_match"] == 1.0


def test_a_sample_logged_twice_counts_once_from_its_first_record() -> None:
    one_hot = [np.eye(CLASSES, dtype=np.float32)[c].tobytes() for c in range(CLASSES)]
    records = [
        AccuracyRecord(0, one_hot[0]),  # right
        AccuracyRecord(1, one_hot[2]),  # wrong, and kept: MLPerf's scripts keep the first
        AccuracyRecord(1, one_hot[1]),
        AccuracyRecord(0, one_hot[3]),
    ]
    metrics = TopOneScorer({}).score(records, Labels(np.array([0, 1])))
    assert metrics == {"top1": 0.5, "samples": 4, "distinct_samples": 2}


def test_unknown_scorer_names_the_field_and_the_choices() -> None:
    with pytest.raises(InvalidArgument) as info:
        create_scorer("top5", {})
    [violation] = info.value.violations
    assert violation.field == "accuracy.scorer"
    assert "top1" in violation.description and "exact_match" in violation.description

    with pytest.raises(InvalidArgument) as info:
        score_accuracy_log(b"[]", b"[]", "nope", {})
    assert info.value.violations[0].field == "accuracy.scorer"


def test_bad_options_name_their_fields() -> None:
    with pytest.raises(InvalidArgument) as info:
        create_scorer("top1", {"dtype": "complex128"})
    assert [v.field for v in info.value.violations] == ["accuracy.options.dtype"]

    # Every bad option is reported at once, under the caller's path.
    with pytest.raises(InvalidArgument) as info:
        create_scorer("top1", {"output": "probabilities", "dtype": "bfloat16", "topk": "5"}, field="spec.accuracy")
    assert sorted(v.field for v in info.value.violations) == [
        "spec.accuracy.options.dtype",
        "spec.accuracy.options.output",
        "spec.accuracy.options.topk",
    ]
    with pytest.raises(InvalidArgument) as info:
        create_scorer("top1", {"output": "class", "dtype": "float16"})
    assert [v.field for v in info.value.violations] == ["accuracy.options.dtype"]
    with pytest.raises(InvalidArgument) as info:
        create_scorer("exact_match", {"prefix": "yes", "normalize": "upper"})
    assert sorted(v.field for v in info.value.violations) == ["accuracy.options.normalize", "accuracy.options.prefix"]


def test_qsl_idx_beyond_the_labels_is_an_error(tmp_path: Path) -> None:
    log = loadgen_accuracy_log(tmp_path, "logits")
    too_few = npy_bytes(CLASS_LABELS[:30])
    with pytest.raises(ValueError, match=r"qsl_idx 30, 31, .* beyond the 30 labels"):
        score_accuracy_log(log, too_few, "top1", {})


def test_accuracy_log_parsing_edge_cases() -> None:
    assert parse_accuracy_log(b"") == []
    assert parse_accuracy_log(b"  \n") == []
    assert parse_accuracy_log(b"[\n\n]\n") == []
    whole = b'[\n{ "seq_id" : 0, "qsl_idx" : 2, "data" : "0A0b" },\n{ "seq_id" : 1, "qsl_idx" : 0, "data" : "" }'
    expected = [AccuracyRecord(2, b"\x0a\x0b"), AccuracyRecord(0, b"")]
    assert parse_accuracy_log(whole + b"\n]\n") == expected
    # A crash leaves the closing bracket off; whole records are still read.
    assert parse_accuracy_log(whole) == expected
    assert parse_accuracy_log(whole + b",\n") == expected
    # token_count (LLM runs) is accepted and not needed.
    assert parse_accuracy_log(b'[{"seq_id": 0, "qsl_idx": 1, "data": "41", "token_count": 1}]') == [
        AccuracyRecord(1, b"A")
    ]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'[\n{ "seq_id" : 0, "qsl_idx" : 2, "data" : "0A', "not valid JSON"),  # cut inside a record
        (b"{not json", "not valid JSON"),
        (b'{"qsl_idx": 1, "data": ""}', "must be a JSON list"),
        (b'[{"qsl_idx": 1, "data": "XYZ"}]', "qsl_idx 1.*not hex"),
        (b'[{"qsl_idx": -1, "data": ""}]', "non-negative integer"),
        (b'[{"qsl_idx": true, "data": ""}]', "non-negative integer"),
        (b'[{"qsl_idx": 1}]', "data must be a hex string"),
        (b"[1, 2]", "record 0 must be an object"),
        (b"\xff\xfe[]", "not UTF-8"),
    ],
)
def test_malformed_accuracy_logs_are_value_errors(content: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_accuracy_log(content)


def test_labels_loading() -> None:
    ints = load_labels(npy_bytes(np.array([3, 1, 2], dtype=np.int32)))
    assert len(ints) == 3 and ints[0] == 3 and list(ints) == [3, 1, 2] and not ints.is_text
    text = load_labels(npy_bytes(np.array(["a", "bc"])))
    assert text.is_text and text[1] == "bc"
    floats = load_labels(b"[1, 2.0, 3.5]")
    assert floats[1] == 2.0 and isinstance(floats[2], float)
    strings = load_labels('["é", "b"]'.encode())
    assert strings.is_text and strings[0] == "é"
    with pytest.raises(IndexError, match="qsl_idx -1"):
        ints[-1]  # never numpy's wrap-around


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"hello", "must be a .npy file or a JSON list"),
        (b'{"0": 1}', "must be a list"),
        (b'[1, "a"]', "all numbers or all strings"),
        (b"[true, false]", "all numbers or all strings"),
        (b"[[1, 2], [3, 4]]", "all numbers or all strings"),
        (b"[99999999999999999999999]", "int64"),
        (b"\x93NUMPY truncated", "not a readable .npy"),
    ],
)
def test_labels_that_are_neither_npy_nor_a_json_list(content: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_labels(content)


def test_labels_npy_shape_and_dtype_are_checked() -> None:
    with pytest.raises(ValueError, match="one-dimensional"):
        load_labels(npy_bytes(np.zeros((2, 2))))
    with pytest.raises(ValueError, match="numbers or strings"):
        load_labels(npy_bytes(np.array([True, False])))


def test_scorers_reject_labels_of_the_wrong_kind_and_bad_responses() -> None:
    logits = np.eye(CLASSES, dtype=np.float32)[1].tobytes()
    with pytest.raises(ValueError, match="numeric class labels"):
        TopOneScorer({}).score([AccuracyRecord(0, logits)], load_labels(b'["cat"]'))
    with pytest.raises(ValueError, match="text labels"):
        ExactMatchScorer({}).score([AccuracyRecord(0, b"1")], load_labels(b"[1]"))
    with pytest.raises(ValueError, match="qsl_idx 0: a response of 3 bytes"):
        TopOneScorer({}).score([AccuracyRecord(0, b"abc")], load_labels(b"[1]"))
    with pytest.raises(ValueError, match="not a class index"):
        TopOneScorer({}).score([AccuracyRecord(0, logits)], load_labels(b"[1.5]"))
    with pytest.raises(ValueError, match="not a whole number"):
        TopOneScorer({"output": "class", "dtype": "float32"}).score(
            [AccuracyRecord(0, np.array([1.5], dtype=np.float32).tobytes())], load_labels(b"[1]")
        )
    # An empty log gives no records; scoring nothing is an error, not an accuracy of 0.
    with pytest.raises(ValueError, match="no records"):
        score_accuracy_log(b"", b"[1]", "top1", {})


_PLUGIN = textwrap.dedent(
    '''
    """A third-party scorer: the fraction of responses as long as their numeric label."""
    from mecbench.core.accuracy import Scorer

    class LengthScorer(Scorer):
        name = "length"
        option_help = {"unit": "bytes"}

        def configure(self, options, violations):
            violations.check(options.get("unit", "bytes") == "bytes", "options.unit", "must be bytes")

        def score(self, records, labels):
            hits = sum(len(r.data) == labels[r.qsl_idx] for r in records)
            return {"length": hits / len(records)}

    NOT_A_SCORER = 42
    '''
)


def test_plugin_scorers_are_found_through_entry_points(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = "mecbench_test_length_scorer"
    (tmp_path / f"{module}.py").write_text(_PLUGIN)
    (tmp_path / "mecbench_test_broken.py").write_text("raise ImportError('the plugin is broken')\n")
    dist_info = tmp_path / "mecbench_test_length_scorer-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: mecbench-test-length-scorer\nVersion: 1.0\n")
    (dist_info / "entry_points.txt").write_text(
        f"[{SCORER_ENTRY_POINT_GROUP}]\n"
        f"length = {module}:LengthScorer\n"
        "broken = mecbench_test_broken:Anything\n"
        f"not_a_class = {module}:NOT_A_SCORER\n"
        f"top1 = {module}:LengthScorer\n"  # a plugin never replaces a built-in
    )
    assert "length" not in available_scorers()
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in (module, "mecbench_test_broken"):
        monkeypatch.delitem(sys.modules, name, raising=False)

    with structlog.testing.capture_logs() as logs:
        scorers = available_scorers()
    assert scorers["length"].__module__ == module
    skipped = {entry["scorer"]: entry for entry in logs if entry["log_level"] == "warning"}
    assert set(skipped) == {"broken", "not_a_class", "top1"}
    assert "the plugin is broken" in skipped["broken"]["error"]
    assert issubclass(scorers["length"], Scorer)
    assert "broken" not in scorers and "not_a_class" not in scorers
    assert scorers["top1"] is TopOneScorer and scorers["exact_match"] is ExactMatchScorer

    log = b'[{"qsl_idx": 0, "data": "0102"}, {"qsl_idx": 1, "data": "01"}]'
    assert score_accuracy_log(log, b"[2, 2]", "length", {}) == {"length": 0.5}
    with pytest.raises(InvalidArgument) as info:
        create_scorer("length", {"unit": "bits"}, field="spec.accuracy")
    assert [v.field for v in info.value.violations] == ["spec.accuracy.options.unit"]


def test_builtins_need_no_package_metadata() -> None:
    # The scorers exist whatever the installed metadata says (an editable install may predate them).
    scorers = available_scorers()
    assert scorers["top1"] is TopOneScorer
    assert scorers["exact_match"] is ExactMatchScorer
