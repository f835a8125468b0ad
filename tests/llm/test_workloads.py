"""LLM workloads: synthetic prompts whose token lengths follow the asked distributions, counted
with a real tokenizer (a tiny byte-level BPE this test trains with the `tokenizers` package; no
hub) or the built-in byte count; prompts from JSONL and ShareGPT-style files; the
`mecbench dataset make-prompts` CLI; and a run of such a dataset through the direct client in
concurrency mode, whose per-request records report the lengths the server measured."""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from mecbench.cli import main as cli_main
from mecbench.core.errors import InvalidArgument
from mecbench.v1 import common_pb2, controller_pb2, loadgen_agent_pb2, sut_agent_pb2
from mecbench.workloads import (
    ByteTokenizer,
    LengthDistribution,
    load_tokenizer,
    make_from_file,
    make_synthetic,
    write_dataset,
)
from tests.controller.conftest import Stack, short_settings
from tests.external_servers import CORPUS, LM_NAME, Models, stack_with_servers
from tests.llm.conftest import write_llm_profiles


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["[UNK]"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    text = CORPUS.decode() + " the of and to in is that it for on was with network edge server client model"
    tokenizer.train_from_iterator([text] * 20, trainer)
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    tokenizer.save(str(path))
    return path


def test_synthetic_lengths_follow_the_asked_distributions_by_a_real_tokenizer(tokenizer_file: Path) -> None:
    tokenizer = load_tokenizer(tokenizer_file.parent)
    prompts = make_synthetic(
        400, LengthDistribution.parse("normal:128:32"), LengthDistribution.parse("fixed:64"), tokenizer, seed=3
    )
    measured = np.array(prompts.input_tokens)
    # Each prompt measures what was drawn for it (re-encoding the cut text can shift a token).
    drawn = LengthDistribution.parse("normal:128:32").sample(np.random.default_rng(3), 400)
    assert np.mean(np.abs(measured - np.array(drawn))) < 1.0
    assert measured.mean() == pytest.approx(128, abs=4)
    assert measured.std() == pytest.approx(32, abs=4)
    assert all(r["max_tokens"] == 64 and r["ignore_eos"] is True for r in prompts.requests)
    assert [len(tokenizer.encode(r["messages"][0]["content"])) for r in prompts.requests] == prompts.input_tokens


def test_distributions_and_shared_prefixes() -> None:
    rng = np.random.default_rng(1)
    uniform = LengthDistribution.parse("uniform:96:160").sample(rng, 2000)
    assert min(uniform) >= 96 and max(uniform) <= 160 and np.mean(uniform) == pytest.approx(128, abs=3)
    histogram = LengthDistribution.parse("histogram:64=0.5,256=0.5").sample(rng, 2000)
    assert set(histogram) == {64, 256} and histogram.count(64) == pytest.approx(1000, abs=120)
    for bad in ("normal:1", "uniform:9:3", "histogram:", "poisson:3", "fixed:0"):
        with pytest.raises(InvalidArgument):
            LengthDistribution.parse(bad)
    prompts = make_synthetic(
        20,
        LengthDistribution.parse("fixed:100"),
        LengthDistribution.parse("fixed:8"),
        ByteTokenizer(),
        prefix_tokens=40,
        api="completions",
    )
    prefix = prompts.requests[0]["prompt"][:40]
    assert all(r["prompt"].startswith(prefix) for r in prompts.requests)
    assert prompts.input_tokens == [100] * 20


def test_jsonl_and_sharegpt_files(tmp_path: Path) -> None:
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text(
        '"plain prompt"\n{"prompt": "another"}\n{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 7}\n'
    )
    prompts = make_from_file(jsonl, ByteTokenizer(), output_lengths=LengthDistribution.parse("fixed:5"))
    assert prompts.requests[0]["messages"][0]["content"] == "plain prompt"
    assert prompts.requests[1]["max_tokens"] == 5
    assert prompts.requests[2] == {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 7}
    assert prompts.output_tokens == [5, 5, 7]
    sharegpt = tmp_path / "sharegpt.json"
    sharegpt.write_text(
        json.dumps(
            [
                {
                    "conversations": [
                        {"from": "human", "value": "What is an edge?"},
                        {"from": "gpt", "value": "A link."},
                    ]
                },
                {"conversations": [{"from": "gpt", "value": "no question"}]},
            ]
        )
    )
    prompts = make_from_file(sharegpt, ByteTokenizer(), api="completions")
    assert prompts.requests == [{"max_tokens": 7, "ignore_eos": True, "prompt": "What is an edge?"}]
    assert prompts.input_tokens == [16]


def test_the_cli_writes_a_dataset_and_its_manifest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "workload.tar"
    code = cli_main(
        [
            "dataset",
            "make-prompts",
            str(output),
            "--count",
            "50",
            "--input-lengths",
            "uniform:20:40",
            "--output-lengths",
            "fixed:16",
            "--api",
            "completions",
            "--json",
        ]
    )
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["samples"] == 50 and summary["input_tokens"]["min"] >= 20
    with tarfile.open(output) as archive:
        names = archive.getnames()
        first = json.loads(archive.extractfile(names[0]).read())  # type: ignore[union-attr]
    assert len(names) == 50 and first["max_tokens"] == 16
    assert cli_main(["dataset", "make-prompts", str(output), "--count", "5"]) != 0


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, models: Models) -> Iterator[Stack]:
    profiles = write_llm_profiles(tmp_path_factory.mktemp("profiles") / "servers.yaml")
    with stack_with_servers(tmp_path_factory, profiles, models.directory) as running:
        yield running


@pytest.mark.slow
def test_a_synthetic_workload_run_reports_the_lengths_the_server_measured(stack: Stack, tmp_path: Path) -> None:
    """ISL 128 +- 32 / OSL 64 through the direct client, 4 requests in flight (Offline + max_in_flight):
    the server's own prompt and completion counts equal the dataset's, sample by sample."""
    prompts = make_synthetic(
        64,
        LengthDistribution.parse("normal:128:32"),
        LengthDistribution.parse("fixed:64"),
        ByteTokenizer(),
        seed=5,
        api="completions",
    )
    dataset = tmp_path / "workload.tar"
    write_dataset(prompts, dataset)
    config = sut_agent_pb2.SutConfig(
        external=sut_agent_pb2.ExternalBackendConfig(profile="llm", model=LM_NAME, options={"api": "completions"})
    )
    stack.stub.DeploySut(controller_pb2.DeploySutRequest(sut_id="workload", config=config))
    spec = controller_pb2.RunSpec(
        experiment_id="workload",
        sut_id="workload",
        settings=short_settings(
            common_pb2.SCENARIO_OFFLINE, min_query_count=64, offline_expected_qps=50.0, use_token_latencies=True
        ),
        dataset=common_pb2.DatasetSpec(uri=str(dataset)),
        data_plane=loadgen_agent_pb2.DataPlaneOptions(
            transport=loadgen_agent_pb2.DATA_PLANE_TRANSPORT_DIRECT, max_in_flight=4
        ),
    )
    run = stack.stub.StartRun(controller_pb2.StartRunRequest(spec=spec)).run
    final = stack.wait(run.run_id, 180)
    assert final.state == common_pb2.RUN_STATE_SUCCEEDED, final.error
    result = final.results[0].aggregate
    assert result.failed_samples == 0 and not result.value_errors
    reply = stack.stub.GetResult(
        controller_pb2.GetResultRequest(run_id=final.run_id, include_files=["llm_requests.jsonl"])
    )
    rows = [json.loads(line) for f in reply.files for line in f.data.splitlines()]
    assert len(rows) == result.sample_count >= 64
    for row in rows:
        assert row["input_tokens"] == prompts.input_tokens[row["sample_index"]]
        assert row["output_tokens"] == 64
    measured = [row["input_tokens"] for row in rows]
    assert np.mean(measured) == pytest.approx(128, abs=10) and np.std(measured) == pytest.approx(32, abs=10)
    assert result.llm_metrics["input_tokens_mean"] == pytest.approx(np.mean(measured))
    assert result.llm_metrics["output_tokens_mean"] == 64
    # Concurrency mode: never more than 4 requests in flight.
    events = sorted([(r["start_s"], 1) for r in rows] + [(r["start_s"] + r["e2e_s"], -1) for r in rows])
    in_flight = np.cumsum([step for _, step in events])
    assert in_flight.max() <= 4
    stack.app.pool.remove_sut("workload")
