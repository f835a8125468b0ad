"""`mecbench storage init`, `mecbench blob upload|list` and `mecbench dataset upload`."""

from __future__ import annotations

import argparse
from pathlib import Path

from mecbench.cli.common import EXIT_OK, EXIT_UNAVAILABLE, UsageError, open_client, out, print_json
from mecbench.v1 import controller_pb2


def readable_file(path: str) -> Path:
    source = Path(path)
    if not source.is_file():
        raise UsageError(f"{path}: no such file")
    return source


def storage_init(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        storage = client.init_storage()
    if args.json:
        print_json(storage)
    else:
        for bucket in storage.buckets:
            state = controller_pb2.BucketState.Name(bucket.state).removeprefix("BUCKET_STATE_").lower()
            out(f"{storage.backend}: bucket {bucket.name} {state}" + (f" ({bucket.message})" if bucket.message else ""))
    failed = any(b.state == controller_pb2.BUCKET_STATE_FAILED for b in storage.buckets)
    # A bucket that cannot be created means the store cannot be reached (or refuses us).
    return EXIT_UNAVAILABLE if failed else EXIT_OK


def blob_upload(args: argparse.Namespace) -> int:
    source = readable_file(args.file)
    with open_client(args) as client:
        blob = client.upload_blob(
            source, args.key or source.name, content_type=args.content_type, overwrite=args.overwrite
        )
    if args.json:
        print_json(blob)
    else:
        out(f"{blob.uri}  {blob.size_bytes} bytes  sha256 {blob.sha256}")
    return EXIT_OK


def blob_list(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        blobs = client.list_blobs(args.prefix)
    if args.json:
        print_json(blobs)
    else:
        for blob in blobs:
            out(f"{blob.uri}  {blob.size_bytes} bytes  sha256 {blob.sha256}")
    return EXIT_OK


def dataset_upload(args: argparse.Namespace) -> int:
    source = readable_file(args.file)
    with open_client(args) as client:
        dataset = client.upload_dataset(source, args.name, overwrite=args.overwrite)
    if args.json:
        print_json(dataset)
    else:
        out(f"uploaded {source} as {dataset.uri} (sha256 {dataset.sha256})")
        out("in an experiment spec:")
        out(f"dataset:\n  uri: {dataset.uri}\n  sha256: {dataset.sha256}")
    return EXIT_OK
