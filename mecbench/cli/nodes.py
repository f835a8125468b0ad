"""`mecbench nodes` (through the controller) and `mecbench shape apply|clear|list` (straight to a
node agent, for debugging shaping by hand)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from contextlib import contextmanager

from google.protobuf.duration_pb2 import Duration

from mecbench.cli.common import (
    EXIT_OK,
    NotFound,
    UsageError,
    netem_parts,
    open_client,
    out,
    print_json,
    render_table,
    when,
)
from mecbench.core import durations
from mecbench.core.channels import open_channel
from mecbench.profiles import PROFILES, parse_percent, parse_rate, parse_time
from mecbench.v1 import common_pb2, node_agent_pb2, node_agent_pb2_grpc

# A node agent answers at once or not at all; shaping itself takes well under a second.
NODE_RPC_TIMEOUT_S = 30.0
DIRECTIONS = {
    "egress": common_pb2.DIRECTION_EGRESS,
    "ingress": common_pb2.DIRECTION_INGRESS,
    "both": common_pb2.DIRECTION_BOTH,
}


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n else "-"


def nodes(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        infos = client.list_nodes()
    if args.json:
        print_json(infos)
        return EXIT_OK
    if not infos:
        out("no nodes")
        return EXIT_OK
    rows = []
    for info in infos:
        gpus = f"{len(info.gpus)} ({', '.join(g.name for g in info.gpus)})" if info.gpus else "0"
        rows.append(
            [
                info.name or "-",
                info.agent_address or "-",
                "node-agent",
                info.kernel or "-",
                str(info.cpu_count or "-"),
                _gib(info.memory_total_bytes),
                gpus,
                ",".join(info.supported_qdiscs) or "none",
            ]
        )
    out(render_table(["node", "address", "kind", "kernel", "CPUs", "memory", "GPUs", "qdiscs"], rows))
    for info in infos:
        # Why shaping or GPUs will not work here: what a user debugging a FAILED_PRECONDITION needs.
        for kind, reason in sorted(info.unsupported_reasons.items()):
            out(f"{info.name}: {kind} unsupported: {reason}")
        if "gpus" in info.labels and not info.gpus:
            out(f"{info.name}: no GPUs: {info.labels['gpus']}")
        if args.interfaces and info.interfaces:
            out()
            out(
                render_table(
                    ["node", "interface", "netns", "addresses", "mtu", "state"],
                    [
                        [info.name, i.name, i.netns or "-", ",".join(i.addresses) or "-", str(i.mtu),
                         "up" if i.up else "down"]
                        for i in info.interfaces
                    ],
                )
            )
    return EXIT_OK


# --- shape --------------------------------------------------------------------------------------


@contextmanager
def node_agent(args: argparse.Namespace) -> Iterator[node_agent_pb2_grpc.NodeAgentStub]:
    address = args.node or os.environ.get("MECBENCH_NODE_AGENT", "")
    if not address:
        raise UsageError("--node: the node agent's HOST:PORT is required (or set $MECBENCH_NODE_AGENT)")
    channel = open_channel(address)
    try:
        yield node_agent_pb2_grpc.NodeAgentStub(channel)
    finally:
        channel.close()


def _target(args: argparse.Namespace) -> node_agent_pb2.ShapingTarget:
    target = node_agent_pb2.ShapingTarget(interface=args.interface)
    if args.netns:
        target.netns_name = args.netns
    elif args.netns_path:
        target.netns_path = args.netns_path
    return target


def _netem_from_flags(args: argparse.Namespace) -> common_pb2.NetemConfig:
    """The profile's figures (if --profile) with each flag given over them; every bad flag is
    reported at once."""
    violations: dict[str, str] = {}
    netem = common_pb2.NetemConfig()
    if args.profile:
        profile = PROFILES.get(args.profile)
        if profile is None:
            violations["--profile"] = f"no profile {args.profile!r} (shipped: {', '.join(PROFILES)})"
        else:
            netem.CopyFrom(profile.netem)
    flags = [
        ("--rate", args.rate, "rate_bps", parse_rate),
        ("--delay", args.delay, "delay", parse_time),
        ("--jitter", args.jitter, "jitter", parse_time),
        ("--loss", args.loss, "loss_percent", parse_percent),
        ("--reorder", args.reorder, "reorder_percent", parse_percent),
        ("--duplicate", args.duplicate, "duplicate_percent", parse_percent),
        ("--corrupt", args.corrupt, "corrupt_percent", parse_percent),
    ]
    for flag, text, name, parse in flags:
        if text is None:
            continue
        try:
            value = parse(text)
        except ValueError as exc:
            violations[flag] = str(exc)
            continue
        if isinstance(value, Duration):
            if durations.to_ns(value):
                # CopyFrom, not a merge: merging 1 s over a profile's 10 ms would keep its nanos.
                getattr(netem, name).CopyFrom(value)
            else:
                # `--delay 0` takes the profile's delay away (zero means "not shaped" anyway).
                netem.ClearField(name)  # type: ignore[arg-type]
        else:
            setattr(netem, name, value)
    if not netem.HasField("jitter"):
        netem.jitter_distribution = common_pb2.JITTER_DISTRIBUTION_UNSPECIFIED
    elif not netem.jitter_distribution:
        netem.jitter_distribution = common_pb2.JITTER_DISTRIBUTION_NORMAL
    if violations:
        raise UsageError("bad shaping flags", violations)
    if not netem_parts(netem):
        raise UsageError(
            "nothing to apply: give --profile (not 'unshaped') or one of --rate, --delay, --jitter, --loss,"
            " --reorder, --duplicate, --corrupt"
        )
    return netem


def _shaping_text(shaping: node_agent_pb2.Shaping) -> list[str]:
    target = shaping.target
    where = target.interface + (f" in {target.netns_name or target.netns_path}" if target.WhichOneof("netns") else "")
    direction = common_pb2.Direction.Name(shaping.direction).removeprefix("DIRECTION_").lower()
    lines = [
        f"shaping {shaping.shaping_id} on {where}, {direction}: {', '.join(netem_parts(shaping.netem)) or '-'}",
        f"lease {shaping.lease.lease_id} (owner {shaping.lease.owner or '-'}) expires {when(shaping.lease.expires_at)}",
    ]
    if shaping.ifb_interface:
        lines.append(f"ingress through {shaping.ifb_interface}")
    lines += [f"  {line}" for line in _qdisc_table(list(shaping.qdiscs)).splitlines()]
    return lines


def _qdisc_table(qdiscs: list[node_agent_pb2.InstalledQdisc]) -> str:
    rows = [
        [
            q.interface,
            q.netns or "-",
            q.kind,
            q.handle or "-",
            q.parent or "-",
            " ".join(f"{k}={v}" for k, v in sorted(q.params.items())) or "-",
        ]
        for q in qdiscs
    ]
    return render_table(["interface", "netns", "qdisc", "handle", "parent", "params (read back)"], rows)


def shape_apply(args: argparse.Namespace) -> int:
    netem = _netem_from_flags(args)
    direction = DIRECTIONS[args.direction] if args.direction else common_pb2.DIRECTION_EGRESS
    if args.profile and not args.direction and PROFILES[args.profile].direction:
        direction = PROFILES[args.profile].direction
    request = node_agent_pb2.ApplyShapingRequest(
        target=_target(args),
        direction=direction,
        netem=netem,
        owner=args.owner,
        replace=args.replace,
    )
    if args.lease_s:
        request.lease_duration.CopyFrom(durations.from_seconds(args.lease_s))
    with node_agent(args) as stub:
        shaping = stub.ApplyShaping(request, timeout=NODE_RPC_TIMEOUT_S).shaping
    if args.json:
        print_json(shaping)
    else:
        out("\n".join(_shaping_text(shaping)))
    return EXIT_OK


def shape_list(args: argparse.Namespace) -> int:
    with node_agent(args) as stub:
        listed = stub.ListShaping(
            node_agent_pb2.ListShapingRequest(include_foreign=args.all), timeout=NODE_RPC_TIMEOUT_S
        )
    if args.json:
        print_json(listed)
        return EXIT_OK
    if not listed.shapings:
        out("no shaping installed by MECBench")
    for shaping in listed.shapings:
        out("\n".join(_shaping_text(shaping)))
    if args.all and listed.foreign:
        out()
        out("qdiscs MECBench did not install:")
        out(_qdisc_table(list(listed.foreign)))
    return EXIT_OK


def shape_clear(args: argparse.Namespace) -> int:
    request = node_agent_pb2.ClearShapingRequest()
    with node_agent(args) as stub:
        if args.shaping_id:
            request.shaping_id = args.shaping_id
        elif args.owner:
            request.owner = args.owner
        elif args.lease_id:
            # The API clears by shaping, target or owner: find the shaping this lease holds.
            listed = stub.ListShaping(node_agent_pb2.ListShapingRequest(), timeout=NODE_RPC_TIMEOUT_S)
            held = [s.shaping_id for s in listed.shapings if s.lease.lease_id == args.lease_id]
            if not held:
                raise NotFound(f"no shaping holds lease {args.lease_id}")
            request.shaping_id = held[0]
        else:
            request.target.CopyFrom(_target(args))
        cleared = list(stub.ClearShaping(request, timeout=NODE_RPC_TIMEOUT_S).cleared_shaping_ids)
    if args.json:
        print_json({"cleared_shaping_ids": cleared})
    elif cleared:
        out(f"cleared {', '.join(cleared)}")
    else:
        out("nothing to clear")
    return EXIT_OK
