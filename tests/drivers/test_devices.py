"""Device drivers. GPUs cannot exist on this machine: FakeGPU stands in for an NVML-reported device."""

import json
from pathlib import Path

import pytest

from llmos.drivers.devices import DeviceTable
from llmos.drivers.gpu import GPUDevice, discover
from llmos.drivers.model.estimate import estimate
from llmos.syscalls.errors import InvalidArgument, OutOfMemory

GiB = 2**30


def FakeGPU(index: int, gib: int) -> GPUDevice:  # noqa: N802 - named as the stand-in it is
    return GPUDevice(index, "Fake NVIDIA GPU (test stand-in)", gib * GiB, budget_fraction=1.0)


def _nvml_gpu_count() -> int:
    """What NVML itself says, independently of the driver under test (0 without a library, driver or device)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return int(pynvml.nvmlDeviceGetCount())
    except Exception:
        return 0


def test_discovery_lists_exactly_the_gpus_nvml_reports_and_none_is_an_empty_list_not_an_error():
    n = _nvml_gpu_count()  # 0 on a machine without an NVIDIA GPU: discovery is then [] and nothing raises
    assert [g.name for g in discover()] == [f"cuda:{i}" for i in range(n)]
    table = DeviceTable()
    assert [d["kind"] for d in table.inventory()] == ["cpu"] + ["gpu"] * n
    cpu = table.usage()[0]
    assert cpu["memory_total_bytes"] > 0 and cpu["budget_bytes"] > 0 and cpu["reserved_bytes"] == 0


def test_placement_prefers_one_gpu_that_fits_then_the_cpu():
    table = DeviceTable(cpu_budget_bytes=64 * GiB, gpus=[FakeGPU(0, 8), FakeGPU(1, 24)])
    assert table.place(10 * GiB).name == "cuda:1"  # only the big one fits
    table.get("cuda:1").allocate("a", 20 * GiB)
    assert table.place(6 * GiB).name == "cuda:0"  # the one with the most room
    table.get("cuda:0").allocate("b", 6 * GiB)
    assert table.place(5 * GiB).name == "cpu"


def test_an_explicit_device_must_exist_and_fit():
    table = DeviceTable(cpu_budget_bytes=1 * GiB, gpus=[FakeGPU(0, 8)])
    with pytest.raises(InvalidArgument):
        table.place(1, "cuda:3")
    with pytest.raises(OutOfMemory):
        table.place(2 * GiB, "cpu")
    assert table.place(4 * GiB, "cuda:0").name == "cuda:0"


def test_reservations_are_freed_per_holder():
    table = DeviceTable(cpu_budget_bytes=3 * GiB, gpus=[])
    table.cpu.allocate("m#0", 2 * GiB)
    with pytest.raises(OutOfMemory):
        table.place(2 * GiB)
    table.free("m#0")
    assert table.place(2 * GiB).name == "cpu"


def test_the_estimate_counts_weights_kv_and_worker_overhead(tiny_model):
    from transformers import AutoModelForCausalLM

    est = estimate(tiny_model, "cpu", kv_tokens=1000)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert est["parameters"] == sum(p.numel() for p in model.parameters())
    assert est["weight_bytes"] == 2 * 4 * est["parameters"]  # float32, plus the oneDNN-packed copy
    assert est["kv_bytes"] == 1000 * est["kv_bytes_per_token"] == 1000 * 2 * 2 * 32 * 4


def test_on_a_gpu_the_estimate_is_bfloat16_weights_and_kv_plus_the_cuda_context(tiny_model):
    """What a GPU worker holds besides its weights and KV (measured on an H200 by benchmarks/gpu.py), not the
    host process's memory: the reservation must cover what NVML will show."""
    from llmos.drivers.model.estimate import GPU_OVERHEAD_BYTES

    cfg = json.loads((Path(tiny_model) / "config.json").read_text())
    cpu = estimate(tiny_model, "cpu", kv_tokens=1000, dtype="float32")
    gpu = estimate(tiny_model, "cuda:0", kv_tokens=1000, dtype="bfloat16")  # what auto takes on a recent GPU
    head32 = 4 * cfg["vocab_size"] * cfg["hidden_size"]  # the paged engine's float32 LM head (float32 logits)
    assert gpu["weight_bytes"] == 2 * gpu["parameters"] + head32 and gpu["kv_bytes"] == cpu["kv_bytes"] // 2  # bf16
    assert gpu["overhead_bytes"] == GPU_OVERHEAD_BYTES >= 768 * 2**20
    assert gpu["total_bytes"] == gpu["weight_bytes"] + gpu["kv_bytes"] + GPU_OVERHEAD_BYTES
