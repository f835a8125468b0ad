"""Node agent logic without a kernel or a GPU: the netem messages it builds (this kernel has no
netem, so they are checked by decoding them as the kernel would read them), its delay
distribution tables, GPU allocation over a declared inventory, and validation."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from google.protobuf.duration_pb2 import Duration

from mecbench.core.errors import InvalidArgument, NotFound, ResourceExhausted
from mecbench.v1 import common_pb2, node_agent_pb2
from node_agent import tc
from node_agent.distributions import distribution_table
from node_agent.gpus import GpuAllocator, NvmlInventory, StaticInventory
from node_agent.settings import NodeAgentSettings
from node_agent.state import StateStore
from node_agent.validation import check_apply
from tests.node_agent.conftest import DECLARED_GPUS


def decoded_netem(params: tc.NetemParams) -> tuple[dict[str, int], dict[str, object]]:
    message = tc.netem_message(3, tc.LEAF_HANDLE, tc.DEFAULT_CLASS, params)
    message.encode()
    echoed = tc.mecbench_tcmsg(message.data)
    echoed.decode()
    assert echoed.get_attr("TCA_KIND") == "netem"
    options = echoed.get_attr("TCA_OPTIONS")
    qopt = {k: int(options[k]) for k in ("delay", "jitter", "loss", "gap", "duplicate", "limit")}
    extras = {name: value for name, value in options["attrs"]}
    return qopt, extras


def test_netem_qopt_is_in_psched_ticks_and_probabilities_of_u32_max() -> None:
    ticks = tc.psched_ticks_per_us()
    qopt, extras = decoded_netem(
        tc.NetemParams(delay_ns=20_000_000, jitter_ns=5_000_000, loss=0.5, duplicate=2.0, limit=1000)
    )
    assert qopt["delay"] == round(20_000 * ticks) and qopt["jitter"] == round(5_000 * ticks)
    assert qopt["loss"] == round(0.005 * (2**32 - 1))  # tc's rounding, not pyroute2's truncation
    assert qopt["duplicate"] == round(0.02 * (2**32 - 1))
    assert qopt["gap"] == 0 and qopt["limit"] == 1000
    assert "TCA_NETEM_REORDER" not in extras and "TCA_NETEM_DELAY_DIST" not in extras


def test_reorder_corrupt_and_distribution_go_in_their_own_attributes() -> None:
    qopt, extras = decoded_netem(
        tc.NetemParams(delay_ns=10_000_000, jitter_ns=2_000_000, distribution="normal", reorder=25.0, corrupt=1.0)
    )
    assert qopt["gap"] == 1  # tc sets gap 1 whenever reorder is set
    reorder = extras["TCA_NETEM_REORDER"]
    corrupt = extras["TCA_NETEM_CORRUPT"]
    assert reorder["prob_reorder"] == round(0.25 * (2**32 - 1))  # type: ignore[index]
    assert corrupt["prob_corrupt"] == round(0.01 * (2**32 - 1))  # type: ignore[index]
    # The table travels as raw signed 16-bit values (TCA_NETEM_DELAY_DIST), as tc sends normal.dist.
    message = tc.netem_message(3, tc.LEAF_HANDLE, tc.DEFAULT_CLASS, tc.NetemParams(
        delay_ns=10_000_000, jitter_ns=2_000_000, distribution="normal"))
    message.encode()
    assert struct.pack("=4096h", *distribution_table("normal")) in bytes(message.data)


def test_distribution_tables_match_iproute2() -> None:
    normal = distribution_table("normal")
    # The first row of iproute2's normal.dist.
    assert normal[:8] == (-32768, -28307, -26871, -25967, -25298, -24765, -24320, -23937)
    assert len(normal) == 4096 and list(normal) == sorted(normal)
    pareto = distribution_table("pareto")
    assert len(pareto) == 4096 and pareto[-1] == 32767
    with pytest.raises(ValueError, match="unknown distribution"):
        distribution_table("cauchy")


def test_rate_above_tbfs_32_bit_field_uses_htb_and_netem_with_a_rate_uses_htb() -> None:
    assert tc.RootPlan(rate_bytes=125_000).kinds == ["tbf"]
    assert tc.RootPlan(rate_bytes=2**33).kinds == ["htb"]
    assert tc.RootPlan(rate_bytes=125_000, netem=tc.NetemParams(delay_ns=1)).kinds == ["htb", "netem"]
    assert tc.RootPlan(netem=tc.NetemParams(delay_ns=1)).kinds == ["netem"]


def test_netem_queue_holds_twice_the_bandwidth_delay_product() -> None:
    # 1 Gbit/s for 100 ms is ~8260 full frames in flight: the default 1000 would drop most of them.
    assert tc.netem_limit(0, 125_000_000, 100_000_000, 0, 1500) == 16_513  # ceil(2 * 12.5 MB / 1514 B)
    assert tc.netem_limit(0, 0, 100_000_000, 0, 1500) == 1000
    assert tc.netem_limit(50, 125_000_000, 100_000_000, 0, 1500) == 50


@pytest.mark.parametrize(
    ("netem", "field"),
    [
        (common_pb2.NetemConfig(reorder_percent=5.0), "netem.reorder_percent"),
        (common_pb2.NetemConfig(jitter=Duration(nanos=1_000_000)), "netem.jitter"),
        (common_pb2.NetemConfig(rate_bps=10), "netem.rate_bps"),
        (common_pb2.NetemConfig(corrupt_percent=float("nan")), "netem.corrupt_percent"),
        (common_pb2.NetemConfig(delay=Duration(seconds=61)), "netem.delay"),
        (common_pb2.NetemConfig(), "netem"),
    ],
)
def test_netem_values_and_combinations_are_checked(netem: common_pb2.NetemConfig, field: str) -> None:
    request = node_agent_pb2.ApplyShapingRequest(
        target=node_agent_pb2.ShapingTarget(interface="veth0", netns_name="x"), netem=netem, owner="run-1"
    )
    with pytest.raises(InvalidArgument) as refused:
        check_apply(request, NodeAgentSettings())
    assert field in [v.field for v in refused.value.violations]


def test_bad_netns_references_are_invalid() -> None:
    for shaping_target in (
        node_agent_pb2.ShapingTarget(interface="veth0", netns_name="../etc"),
        node_agent_pb2.ShapingTarget(interface="veth0", netns_path="/etc/passwd"),
    ):
        request = node_agent_pb2.ApplyShapingRequest(
            target=shaping_target, netem=common_pb2.NetemConfig(rate_bps=1_000_000), owner="run-1"
        )
        with pytest.raises(InvalidArgument):
            check_apply(request, NodeAgentSettings())


@pytest.fixture
def allocator(tmp_path: Path) -> GpuAllocator:
    return GpuAllocator(StateStore(tmp_path / "state.sqlite3"), StaticInventory(list(DECLARED_GPUS)))


def test_gpus_are_allocated_exclusively_by_count_uuid_or_index(allocator: GpuAllocator) -> None:
    first = allocator.allocate(common_pb2.GpuRequest(count=1), "run-a", 60)
    assert [g.index for g in first.gpus] == [0]
    assert first.env == {"CUDA_VISIBLE_DEVICES": DECLARED_GPUS[0].uuid, "NVIDIA_VISIBLE_DEVICES": DECLARED_GPUS[0].uuid}
    assert first.resources == {"nvidia.com/gpu": "1"}
    with pytest.raises(ResourceExhausted, match="held by run-a"):
        allocator.allocate(common_pb2.GpuRequest(uuids=[DECLARED_GPUS[0].uuid]), "run-b", 60)
    with pytest.raises(ResourceExhausted, match="1 free"):
        allocator.allocate(common_pb2.GpuRequest(count=2), "run-b", 60)
    second = allocator.allocate(common_pb2.GpuRequest(indices=[1]), "run-b", 60)
    assert [g.uuid for g in second.gpus] == [DECLARED_GPUS[1].uuid]
    assert {g.index: g.allocated_to for g in allocator.listed()} == {
        0: first.lease.lease_id, 1: second.lease.lease_id
    }
    assert allocator.release(first.lease.lease_id) == [0]
    assert allocator.release(first.lease.lease_id) == []  # idempotent
    assert [g.index for g in allocator.allocate(common_pb2.GpuRequest(count=1), "run-c", 60).gpus] == [0]


def test_a_lapsed_gpu_lease_frees_its_gpus(allocator: GpuAllocator) -> None:
    allocator.allocate(common_pb2.GpuRequest(count=2), "run-a", 0.01)
    import time

    time.sleep(0.05)
    again = allocator.allocate(common_pb2.GpuRequest(count=2), "run-b", 60)
    assert len(again.gpus) == 2


def test_bad_gpu_requests(allocator: GpuAllocator) -> None:
    with pytest.raises(InvalidArgument):
        allocator.allocate(common_pb2.GpuRequest(), "run-a", 60)
    with pytest.raises(InvalidArgument):
        allocator.allocate(common_pb2.GpuRequest(count=1, indices=[0]), "run-a", 60)
    with pytest.raises(InvalidArgument):
        allocator.allocate(common_pb2.GpuRequest(indices=[7]), "run-a", 60)
    with pytest.raises(NotFound):
        allocator.allocate(common_pb2.GpuRequest(uuids=["GPU-nope"]), "run-a", 60)
    assert all(not g.allocated_to for g in allocator.listed())


def test_nvml_without_a_driver_is_an_empty_inventory_not_an_error() -> None:
    inventory = NvmlInventory()
    try:
        if not inventory.unavailable_reason:
            pytest.skip("a GPU driver is present: tests/node_agent/test_gpus.py covers it")
        assert inventory.devices() == [] and inventory.readings() == []
        assert "NVML" in inventory.unavailable_reason
    finally:
        inventory.close()


def test_the_distribution_table_survives_pyroute2_compiling_its_own_netem_map_first() -> None:
    """Regression: pyroute2 marks a class's attribute map compiled in a class attribute that a
    subclass inherits; once IPRoute had decoded a tc message, the table was dropped."""
    from pyroute2.netlink.rtnl.tcmsg import sched_netem, tcmsg

    tcmsg().encode()  # compile pyroute2's own maps first, as reading qdiscs does
    sched_netem.options().encode()
    message = tc.netem_message(3, tc.LEAF_HANDLE, tc.DEFAULT_CLASS, tc.NetemParams(
        delay_ns=10_000_000, jitter_ns=2_000_000, distribution="pareto"))
    message.encode()
    assert struct.pack("=4096h", *distribution_table("pareto")) in bytes(message.data)
