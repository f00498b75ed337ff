"""benchmarks/bench_gpu.py, run the CPU way (tiny preset, fp32, one step): the GPU script is ready and its
figures are internally consistent."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_peak_table_matches_device_names(bench):
    assert bench.lookup_peak("NVIDIA H200")[0] == pytest.approx(989.5)
    assert bench.lookup_peak("NVIDIA H100 80GB HBM3")[0] == pytest.approx(989.5)
    assert bench.lookup_peak("NVIDIA H100 PCIe")[0] == pytest.approx(756.5)
    assert bench.lookup_peak("NVIDIA A100-SXM4-80GB")[0] == 312.0
    assert bench.lookup_peak("NVIDIA A10")[0] == 125.0
    assert bench.lookup_peak("NVIDIA L40S")[0] == pytest.approx(362.05)
    assert bench.lookup_peak("NVIDIA L4")[0] == 121.0
    assert bench.lookup_peak("Some Future GPU")[0] is None


def test_cpu_run_writes_consistent_figures(bench, tmp_path):
    out = tmp_path / "gpu.json"
    argv = ["--device", "cpu", "--preset", "tiny", "--precisions", "fp32", "--steps", "1", "--warmup", "0",
            "--ft-patch", "32", "32", "32", "--ft-classes", "4", "--peak-tflops", "1.0", "--out", str(out)]  # fmt: skip
    bench.main(argv)
    result = json.loads(out.read_text())
    assert result["env"]["torch"] and "--preset tiny" in result["env"]["command"]
    rows = {r["execution"]: r for r in result["pretraining"]}
    assert set(rows) == {"packed", "dense"}
    for r in rows.values():
        assert r["samples_per_s"] > 0 and r["peak_memory_gb"] > 0 and r["crop"] == 64
        assert 0 < r["mfu"] <= r["hfu"] + 1e-12  # model FLOPs are the packed ones: never more than executed
    # dense execution computes the masked voxels too: more FLOPs counted for the same maths
    assert rows["dense"]["flops_per_step"] > rows["packed"]["flops_per_step"] > 0
    ft = {r["network"].split()[0]: r for r in result["finetuning"]}
    assert set(ft) == {"MiMSegmentationNetwork", "nnU-Net"}
    for r in ft.values():
        assert r["iteration_s"] > 0 and r["flops_per_iteration"] > 0 and r["patch"] == [32, 32, 32]
    assert "| fine-tuning |" in result["table"]
