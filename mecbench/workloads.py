"""LLM workloads as datasets: prompts whose input and output token lengths follow distributions,
or prompts taken from JSONL and ShareGPT-style files, written as a dataset LoadGen sessions load
(a tar with one JSON request per sample, e.g. `{"messages": [...], "max_tokens": 64,
"ignore_eos": true}`; the server type puts its fields into the request body as they are).

Lengths are counted with a real tokenizer loaded from a local `tokenizer.json` (the `tokenizers`
package; no hub access), or, without one, a built-in byte-level count (one token per UTF-8
byte, what MECBench's model server counts). A distribution is written `fixed:128`,
`uniform:96:160`, `normal:128:32` (mean, standard deviation; rounded, at least 1) or
`histogram:64=0.5,128=0.3,256=0.2` (length=weight). A shared prefix of N tokens starts every
prompt (prefix-cache studies). The output length is enforced with `max_tokens` (or
`max_completion_tokens`) and `ignore_eos`, so the server generates exactly that many tokens.

`make_prompts` also returns a manifest: what was asked and what each sample measured, so a run
can be checked against it.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from mecbench.core.errors import InvalidArgument

MANIFEST_MEMBER = "manifest.json"
# Words the synthetic prompts are made of: common English, so real tokenizers split them as
# they would split text.
_WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "that",
    "it",
    "for",
    "on",
    "was",
    "with",
    "as",
    "be",
    "at",
    "by",
    "this",
    "from",
    "or",
    "an",
    "are",
    "which",
    "but",
    "not",
    "have",
    "one",
    "all",
    "were",
    "when",
    "there",
    "can",
    "more",
    "if",
    "out",
    "so",
    "what",
    "time",
    "up",
    "about",
    "into",
    "than",
    "them",
    "some",
    "could",
    "only",
    "other",
    "then",
    "now",
    "its",
    "over",
    "also",
    "after",
    "new",
    "use",
    "two",
    "how",
    "our",
    "work",
    "first",
    "well",
    "way",
    "even",
    "because",
    "any",
    "these",
    "give",
    "day",
    "most",
    "network",
    "edge",
    "server",
    "client",
    "model",
    "answer",
    "query",
    "latency",
    "token",
    "stream",
    "link",
    "benchmark",
    "measure",
    "rate",
    "cell",
    "phone",
    "city",
    "road",
    "river",
    "light",
    "small",
    "large",
    "early",
    "late",
    "quick",
    "slow",
]


class Tokenizer(Protocol):
    name: str

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """The built-in fallback: one token per UTF-8 byte (what MECBench's model server counts)."""

    name = "bytes"

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(ids).decode("utf-8", "ignore")


class FileTokenizer:
    """A Hugging Face `tokenizer.json` loaded from a local path with the `tokenizers` package."""

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer as HfTokenizer

        try:
            self._tokenizer = HfTokenizer.from_file(str(path))
        except Exception as exc:  # noqa: BLE001 - the package raises its own exception type for bad files
            raise InvalidArgument(
                f"not a tokenizer.json the tokenizers package reads: {exc}", field="tokenizer"
            ) from None
        self.name = str(path)

    def encode(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._tokenizer.decode(list(ids)))


def load_tokenizer(path: str | Path | None) -> Tokenizer:
    """The tokenizer at `path` (a tokenizer.json, or a folder holding one), else the byte count."""
    if not path:
        return ByteTokenizer()
    location = Path(path)
    if location.is_dir():
        location = location / "tokenizer.json"
    if not location.is_file():
        raise InvalidArgument(f"no tokenizer.json at {location}", field="tokenizer")
    return FileTokenizer(location)


@dataclass(frozen=True)
class LengthDistribution:
    """Token lengths: fixed, uniform (inclusive), normal (rounded, at least 1) or a histogram."""

    kind: str
    values: tuple[float, ...]
    weights: tuple[float, ...] = ()
    text: str = ""

    @classmethod
    def parse(cls, text: str, field_name: str = "length") -> LengthDistribution:
        kind, _, rest = text.strip().partition(":")
        try:
            if kind == "fixed":
                values: tuple[float, ...] = (float(int(rest)),)
            elif kind == "uniform":
                low, high = (int(part) for part in rest.split(":"))
                if low > high:
                    raise ValueError("low above high")
                values = (float(low), float(high))
            elif kind == "normal":
                mean, std = (float(part) for part in rest.split(":"))
                if std < 0:
                    raise ValueError("negative standard deviation")
                values = (mean, std)
            elif kind == "histogram":
                pairs = [part.split("=") for part in rest.split(",") if part.strip()]
                values = tuple(float(int(length)) for length, _ in pairs)
                weights = tuple(float(weight) for _, weight in pairs)
                if not values or any(w < 0 for w in weights) or sum(weights) <= 0:
                    raise ValueError("weights must be non-negative with a positive sum")
                return cls(kind, values, weights, text)
            else:
                raise ValueError("unknown kind")
        except ValueError as exc:
            raise InvalidArgument(
                f"{text!r} is not a length distribution (fixed:N, uniform:LOW:HIGH, normal:MEAN:STD, "
                f"histogram:LEN=WEIGHT,...): {exc}",
                field=field_name,
            ) from None
        if any(v < 0 for v in values) or (kind != "normal" and min(values) < 1):
            raise InvalidArgument(f"{text!r}: lengths must be at least 1", field=field_name)
        return cls(kind, values, (), text)

    def sample(self, rng: np.random.Generator, count: int) -> list[int]:
        if self.kind == "fixed":
            drawn = np.full(count, self.values[0])
        elif self.kind == "uniform":
            drawn = rng.integers(int(self.values[0]), int(self.values[1]) + 1, size=count)
        elif self.kind == "normal":
            drawn = np.rint(rng.normal(self.values[0], self.values[1], size=count))
        else:
            probabilities = np.asarray(self.weights) / sum(self.weights)
            drawn = rng.choice(np.asarray(self.values), size=count, p=probabilities)
        return [max(1, int(v)) for v in drawn]


@dataclass
class PromptSet:
    """Requests of a dataset and what each measured."""

    requests: list[dict[str, Any]]
    input_tokens: list[int]
    output_tokens: list[int]
    manifest: dict[str, Any] = field(default_factory=dict)


def _text_of_length(tokenizer: Tokenizer, target: int, rng: np.random.Generator) -> str:
    """Random words cut to exactly `target` tokens of `tokenizer` where the tokenizer allows
    (decoding and re-encoding may merge at the cut: the length is corrected a few times)."""
    words: list[str] = []
    ids: list[int] = []
    while len(ids) < target + 8:
        words.extend(rng.choice(_WORDS, size=max(16, target)).tolist())
        ids = tokenizer.encode(" ".join(words))
    take = target
    text = tokenizer.decode(ids[:take])
    for _ in range(8):
        measured = len(tokenizer.encode(text))
        if measured == target:
            break
        take += target - measured
        take = max(1, min(take, len(ids)))
        text = tokenizer.decode(ids[:take])
    return text


def _request(api: str, prompt: str, max_tokens: int, max_tokens_field: str) -> dict[str, Any]:
    if api == "ollama":
        return {"prompt": prompt, "options": {"num_predict": max_tokens}}
    request: dict[str, Any] = {max_tokens_field: max_tokens, "ignore_eos": True}
    if api == "chat":
        request["messages"] = [{"role": "user", "content": prompt}]
    elif api == "completions":
        request["prompt"] = prompt
    else:
        raise InvalidArgument(f"unknown api {api!r}: chat, completions or ollama", field="api")
    return request


def _describe(values: Sequence[int]) -> dict[str, float]:
    array = np.asarray(values, dtype=np.float64)
    return {
        "mean": float(array.mean()),
        "std": float(array.std()),
        "min": float(array.min()),
        "max": float(array.max()),
    }


def make_synthetic(
    count: int,
    input_lengths: LengthDistribution,
    output_lengths: LengthDistribution,
    tokenizer: Tokenizer,
    *,
    seed: int = 0,
    prefix_tokens: int = 0,
    api: str = "chat",
    max_tokens_field: str = "max_tokens",
) -> PromptSet:
    """`count` requests whose prompts measure the drawn input lengths (a shared prefix of
    `prefix_tokens` included) and ask for the drawn output lengths."""
    if count < 1:
        raise InvalidArgument("must be at least 1", field="count")
    rng = np.random.default_rng(seed)
    prefix = _text_of_length(tokenizer, prefix_tokens, rng) + " " if prefix_tokens > 0 else ""
    prefix_measured = len(tokenizer.encode(prefix)) if prefix else 0
    inputs = input_lengths.sample(rng, count)
    outputs = output_lengths.sample(rng, count)
    requests: list[dict[str, Any]] = []
    measured: list[int] = []
    for target, max_tokens in zip(inputs, outputs, strict=True):
        body = _text_of_length(tokenizer, max(1, target - prefix_measured), rng)
        prompt = prefix + body
        measured.append(len(tokenizer.encode(prompt)))
        requests.append(_request(api, prompt, max_tokens, max_tokens_field))
    manifest = {
        "source": "synthetic",
        "tokenizer": tokenizer.name,
        "seed": seed,
        "count": count,
        "input_lengths": input_lengths.text,
        "output_lengths": output_lengths.text,
        "prefix_tokens": prefix_measured,
        "input_tokens": measured,
        "output_tokens": outputs,
        "measured_input": _describe(measured),
        "requested_output": _describe(outputs),
    }
    return PromptSet(requests, measured, outputs, manifest)


def _sharegpt_pairs(data: Any) -> Iterable[tuple[str, str | None]]:
    for entry in data if isinstance(data, list) else []:
        turns = entry.get("conversations") if isinstance(entry, dict) else None
        if not isinstance(turns, list) or not turns:
            continue
        human = next(
            (t.get("value") for t in turns if isinstance(t, dict) and t.get("from") in ("human", "user")), None
        )
        answer = next(
            (t.get("value") for t in turns if isinstance(t, dict) and t.get("from") in ("gpt", "assistant")), None
        )
        if isinstance(human, str) and human.strip():
            yield human, answer if isinstance(answer, str) else None


def make_from_file(
    path: Path,
    tokenizer: Tokenizer,
    *,
    count: int = 0,
    output_lengths: LengthDistribution | None = None,
    seed: int = 0,
    api: str = "chat",
    max_tokens_field: str = "max_tokens",
) -> PromptSet:
    """Requests from a JSONL file (a line is a prompt string, `{"prompt": ...}`, or a whole
    request object kept as it is) or a ShareGPT-style JSON list (the first human turn is the
    prompt; the first answer's token count the output length, as `vllm bench serve` takes it,
    unless `output_lengths` is given). `count` 0: all of them."""
    rng = np.random.default_rng(seed)
    text = path.read_text()
    pairs: list[tuple[str | dict[str, Any], int | None]] = []
    if path.suffix == ".jsonl":
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except ValueError:
                raise InvalidArgument(f"line {number} is not JSON", field="input") from None
            if isinstance(item, dict) and "prompt" in item and len(item) == 1:
                item = item["prompt"]
            if not isinstance(item, str | dict):
                raise InvalidArgument(f"line {number} is neither a prompt nor a request object", field="input")
            pairs.append((item, None))
    else:
        try:
            data = json.loads(text)
        except ValueError:
            raise InvalidArgument("not JSON (a ShareGPT-style list) nor .jsonl", field="input") from None
        for prompt, answer in _sharegpt_pairs(data):
            pairs.append((prompt, len(tokenizer.encode(answer)) if answer else None))
    if not pairs:
        raise InvalidArgument("holds no prompts", field="input")
    if count:
        pairs = [pairs[i] for i in rng.permutation(len(pairs))[:count]] if count < len(pairs) else pairs
    drawn = output_lengths.sample(rng, len(pairs)) if output_lengths is not None else None
    requests: list[dict[str, Any]] = []
    inputs: list[int] = []
    outputs: list[int] = []
    for position, (item, answer_tokens) in enumerate(pairs):
        if isinstance(item, dict):
            requests.append(item)
            prompt = str(item.get("prompt") or json.dumps(item.get("messages", "")))
            outputs.append(int(item.get(max_tokens_field, 0) or 0))
        else:
            prompt = item
            max_tokens = drawn[position] if drawn is not None else max(1, answer_tokens or 128)
            requests.append(_request(api, prompt, max_tokens, max_tokens_field))
            outputs.append(max_tokens)
        inputs.append(len(tokenizer.encode(prompt)))
    manifest = {
        "source": str(path),
        "tokenizer": tokenizer.name,
        "count": len(requests),
        "input_tokens": inputs,
        "output_tokens": outputs,
        "measured_input": _describe(inputs),
        "requested_output": _describe(outputs),
    }
    return PromptSet(requests, inputs, outputs, manifest)


def write_dataset(prompts: PromptSet, path: Path) -> Path:
    """A tar of one JSON request per sample (`sample-000000.json`, ...), in order, loaded by
    LoadGen sessions as they load any tar dataset; the manifest is written beside it
    (`<path>.manifest.json`), not inside, so it is no sample."""
    with tarfile.open(path, "w") as archive:
        for index, request in enumerate(prompts.requests):
            data = json.dumps(request, separators=(",", ":")).encode()
            member = tarfile.TarInfo(f"sample-{index:06d}.json")
            member.size = len(data)
            archive.addfile(member, io.BytesIO(data))
    manifest_path = path.with_name(path.name + ".manifest.json")
    manifest_path.write_text(json.dumps(prompts.manifest, indent=1) + "\n")
    return manifest_path
