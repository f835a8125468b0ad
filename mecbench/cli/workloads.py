"""`mecbench dataset make-prompts`: an LLM workload as a dataset file (mecbench.workloads)."""

from __future__ import annotations

import argparse
from pathlib import Path

from mecbench.cli.common import EXIT_OK, UsageError, out, print_json
from mecbench.workloads import (
    LengthDistribution,
    PromptSet,
    load_tokenizer,
    make_from_file,
    make_synthetic,
    write_dataset,
)


def add_make_prompts_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output", help="the dataset to write: a tar of one JSON request per sample")
    parser.add_argument("--count", type=int, default=0, help="samples (synthetic: required; from a file: 0 = all)")
    parser.add_argument("--input-lengths", default="", metavar="DIST",
                        help="synthetic prompts' token lengths: fixed:N, uniform:LOW:HIGH, normal:MEAN:STD, "
                        "histogram:LEN=WEIGHT,...")
    parser.add_argument("--output-lengths", default="", metavar="DIST",
                        help="tokens to generate (max_tokens + ignore_eos), same forms (from a ShareGPT "
                        "file: default the first answer's length)")
    parser.add_argument("--from", dest="source", default="", metavar="FILE",
                        help="prompts from a .jsonl file (prompts or whole requests) or a ShareGPT-style .json")
    parser.add_argument("--tokenizer", default="", metavar="PATH",
                        help="a local tokenizer.json (or its folder) to count tokens with; default: bytes")
    parser.add_argument("--prefix-tokens", type=int, default=0, help="a shared prefix of N tokens on every prompt")
    parser.add_argument("--api", default="chat", choices=("chat", "completions", "ollama"),
                        help="the request shape: OpenAI chat (default), OpenAI completions, or Ollama")
    parser.add_argument("--max-tokens-field", default="max_tokens",
                        choices=("max_tokens", "max_completion_tokens"), help="OpenAI's name of the output limit")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def dataset_make_prompts(args: argparse.Namespace) -> int:
    tokenizer = load_tokenizer(args.tokenizer or None)
    outputs = LengthDistribution.parse(args.output_lengths, "--output-lengths") if args.output_lengths else None
    prompts: PromptSet
    if args.source:
        source = Path(args.source)
        if not source.is_file():
            raise UsageError(f"--from: no such file {source}")
        prompts = make_from_file(
            source, tokenizer, count=args.count, output_lengths=outputs, seed=args.seed, api=args.api,
            max_tokens_field=args.max_tokens_field,
        )
    else:
        missing = {
            flag: "needed for synthetic prompts"
            for flag, value in (("--count", args.count), ("--input-lengths", args.input_lengths),
                                ("--output-lengths", args.output_lengths))
            if not value
        }
        if missing:
            raise UsageError("synthetic prompts need a count and both length distributions", missing)
        assert outputs is not None
        prompts = make_synthetic(
            args.count, LengthDistribution.parse(args.input_lengths, "--input-lengths"), outputs, tokenizer,
            seed=args.seed, prefix_tokens=args.prefix_tokens, api=args.api, max_tokens_field=args.max_tokens_field,
        )
    manifest_path = write_dataset(prompts, Path(args.output))
    summary = {
        "dataset": args.output,
        "manifest": str(manifest_path),
        "samples": len(prompts.requests),
        "tokenizer": tokenizer.name,
        "input_tokens": prompts.manifest["measured_input"],
        "output_tokens": prompts.manifest["requested_output"],
    }
    if args.json:
        print_json(summary)
    else:
        measured = summary["input_tokens"]
        asked = summary["output_tokens"]
        out(f"wrote {summary['samples']} requests to {args.output} (manifest {manifest_path})")
        out(f"input tokens ({tokenizer.name}): mean {measured['mean']:.1f}, std {measured['std']:.1f}, "
            f"min {measured['min']:.0f}, max {measured['max']:.0f}")
        out(f"output tokens asked: mean {asked['mean']:.1f}, std {asked['std']:.1f}, "
            f"min {asked['min']:.0f}, max {asked['max']:.0f}")
        out(f"in an experiment spec:\ndataset:\n  uri: {Path(args.output).resolve()}")
    return EXIT_OK
