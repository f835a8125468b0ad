"""NVML for real: runs where a GPU is present (the device tool's machine), skips elsewhere."""

from __future__ import annotations

import pytest

from node_agent.gpus import NvmlInventory


def test_nvml_inventory_and_readings_on_a_real_gpu() -> None:
    inventory = NvmlInventory()
    try:
        if inventory.unavailable_reason:
            pytest.skip(inventory.unavailable_reason)
        devices = inventory.devices()
        assert devices, "NVML answered but listed no GPU"
        for device in devices:
            assert device.uuid.startswith(("GPU-", "MIG-")) and device.memory_total_bytes > 0 and device.name
        readings = inventory.readings()
        assert [r.index for r in readings] == [d.index for d in devices]
        assert all(0.0 <= r.utilization_percent <= 100.0 and r.power_watts >= 0.0 for r in readings)
    finally:
        inventory.close()
