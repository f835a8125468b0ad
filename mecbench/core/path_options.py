"""The DataPlaneOptions fields that only one of a session's two data-plane paths applies, and the
field violations of those set for the path a session does not use.

A session relays its samples through the SUT agent (loadgen_agent.worker.RelayClient: StreamInfer
over gRPC or plain TCP) or its client talks to the SUT's external server directly
(loadgen_agent.direct.DirectClient). Which one is the session's own choice when it opens
(SessionWorker.setup: the direct client for an external server whose type has a client half,
unless the transport asks for the relay), so only the session can check. A field of the other
path would be accepted and change nothing, the worst a benchmark can do with its input: it is
refused instead, every such field named.

The path then stays for the session's life: the direct client follows the SUT's server from test
to test (SessionWorker._follow_server) or fails the test, and the relay never turns direct; so
the check at open holds for every test.
"""

from __future__ import annotations

from google.protobuf.duration_pb2 import Duration

from mecbench.core.errors import FieldViolation, Violations
from mecbench.v1 import loadgen_agent_pb2

# RelayClient's batching and streams; DirectClient reads none of them.
RELAY_ONLY_FIELDS = ("max_batch_size", "max_batch_delay", "streams", "omit_payloads", "min_frame_interval")
# DirectClient's request scheduling; RelayClient reads neither (`relayed` clears them).
DIRECT_ONLY_FIELDS = ("max_in_flight", "ramp")

_RELAYED = (
    "applies to the direct client path only; this session relays samples through the SUT agent (its "
    "transport asks for the relay, or the SUT agent serves no external server with a direct client)"
)
_DIRECT = (
    "applies to the relay path only; this session's client talks to the SUT's external server directly "
    "(DATA_PLANE_TRANSPORT_GRPC or DATA_PLANE_TRANSPORT_TCP relays samples through the SUT agent instead)"
)


def is_set(options: loadgen_agent_pb2.DataPlaneOptions, name: str) -> bool:
    """Whether field `name` asks for anything: a message present, a duration or number not zero,
    a flag true (a zero duration is the default's behaviour, so it asks for nothing)."""
    value = getattr(options, name)
    if isinstance(value, Duration):
        return bool(value.seconds or value.nanos)
    if name == "ramp":
        return options.HasField("ramp")
    return bool(value)


def relayed(options: loadgen_agent_pb2.DataPlaneOptions) -> loadgen_agent_pb2.DataPlaneOptions:
    """`options` for a session that relays whatever the spec's own sessions do (the harness
    calibration's synthetic SUT): the fields only the direct path applies cleared, and a
    DATA_PLANE_TRANSPORT_DIRECT left to the session (a synthetic SUT has no server to reach)."""
    relay = loadgen_agent_pb2.DataPlaneOptions()
    relay.CopyFrom(options)
    relay.ClearField("max_in_flight")
    relay.ClearField("ramp")
    if relay.transport == loadgen_agent_pb2.DATA_PLANE_TRANSPORT_DIRECT:
        relay.ClearField("transport")
    return relay


def path_option_violations(
    options: loadgen_agent_pb2.DataPlaneOptions, direct: bool, prefix: str = "data_plane"
) -> list[FieldViolation]:
    """A violation for each field of `options` set that the session's path does not apply:
    `direct` is whether the session's client talks to the external server directly."""
    violations = Violations()
    for name in RELAY_ONLY_FIELDS if direct else DIRECT_ONLY_FIELDS:
        violations.check(not is_set(options, name), f"{prefix}.{name}", _DIRECT if direct else _RELAYED)
    return violations.items
