"""The fused CUDA kernels' global memory traffic, counted by the emulation (every lane's load and
store, by warp instruction: csrc/cuda_emu/memory_traffic.cpp) and the GPU model built on it
(benchmarks/gpu_model.py): coalesced accesses, no access outside the count, no byte moved that
the op does not need beyond its small workspaces, shared z read once, and load bursts as the
kernels' structure says."""
import importlib.util
import math
from pathlib import Path

import pytest
import torch

from purified_ops import ops as ops_layer

spec = importlib.util.spec_from_file_location("gpu_model", Path(__file__).parents[1] / "benchmarks" / "gpu_model.py")
gpu_model = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_model)

needs_emulation = pytest.mark.skipif(ops_layer.emulated_cuda_module() is None,
                                     reason="the emulated CUDA backend is not built (PURIFIED_OPS_CUDA_EMU=1)")

# Aligned shapes (D a multiple of the 16-byte vector width): a whole tile, a partial one (1000:
# some lanes predicated off), several tiles (4096 at K >= 4).
SHAPES = [("bfloat16", 1, 1000), ("float32", 1, 256), ("bfloat16", 4, 4096), ("float32", 4, 1000),
          ("float32", 16, 256), ("bfloat16", 16, 1024)]


def run(op, dtype, K, D, layout, rows=8):
    x, z, gy = gpu_model.inputs(dtype, K, D, layout, rows if layout == "z_per_row" else gpu_model.SHARED_ROWS)
    if op == "forward":
        return gpu_model.run_forward(x, z), (x, z)
    return gpu_model.run_backward(x, z, gy), (x, z)


@needs_emulation
@pytest.mark.parametrize("layout", gpu_model.LAYOUTS)
@pytest.mark.parametrize("op", ["forward", "backward"])
@pytest.mark.parametrize("dtype,K,D", SHAPES, ids=[f"{d}-{k}-{n}" for d, k, n in SHAPES])
def test_memory_traffic_coalesced_and_complete_emulated(op, dtype, K, D, layout):
    (launches, reads, writes, _), _ = run(op, dtype, K, D, layout)
    names = [launch["name"] for launch in launches]
    assert names == (["forward"] if op == "forward" else ["backward", "backward_finalize"])
    for launch in launches:
        for site in launch["sites"]:
            assert site["sectors"] >= site["ideal_sectors"] > 0, site
        eff = gpu_model.sector_efficiency(launch)
        assert eff >= 0.95, (launch["name"], eff, [s for s in launch["sites"] if s["sectors"] > s["ideal_sectors"]])
    # Every element of every input read and of every output written: no access escapes the count.
    read_ranges = [r for launch in launches for r in launch["read_ranges"]]
    write_ranges = [r for launch in launches for r in launch["write_ranges"]]
    for t in reads:
        assert gpu_model.covers(read_ranges, gpu_model.tensor_range(t)), t.shape
    for t in writes:
        assert gpu_model.covers(write_ranges, gpu_model.tensor_range(t)), t.shape
    read_b, write_b = gpu_model.distinct_bytes(launches)
    minimal = gpu_model.minimal_bytes(reads, writes)
    assert read_b + write_b >= minimal
    if layout == "z_per_row":
        assert (read_b + write_b) / minimal <= 1.05


@needs_emulation
@pytest.mark.parametrize("dtype,K,D", [("bfloat16", 4, 1024), ("float32", 16, 256)])
def test_forward_reads_shared_z_once_emulated(dtype, K, D):
    # z shared over 64 rows, several work items per z row, each loading it: the distinct bytes
    # read are x's, z's (once) and the strength's, nothing more (no per-row copy of z).
    (launches, reads, writes, _), (x, z) = run("forward", dtype, K, D, "z_shared_64")
    read_b, write_b = gpu_model.distinct_bytes(launches)
    assert read_b == x.numel() * x.element_size() + z.numel() * z.element_size() + 4
    assert read_b + write_b == gpu_model.minimal_bytes(reads, writes)
    # Several work items did load z (loaded bytes, summed per warp instruction, exceed the distinct
    # ones): their reuse is L2's to serve.
    assert sum(s["bytes"] for s in launches[0]["sites"] if not s["store"]) > read_b


def structural_burst(op, dtype, K, D):
    """The largest bytes a warp loads before it uses them, from the kernels' structure: pass 1's
    tile (K directions and the row, in the 16-byte vectors of the first warp's lanes that hold
    columns of the row). The forward's thread 0 loads the strength (4 bytes) with its first tile.
    The backward loads the strength (4 bytes a lane) first: in a team of
    several warps, the others load it in one burst with their first tile (warp 0 reads the factor
    in between, and at these shapes every warp holds as many vectors as warp 0). Its pass 2 over
    several tiles loads the first x vector with a reloaded tile."""
    esize = torch.tensor([], dtype=gpu_model.DTYPES[dtype]).element_size()
    W = 16 // esize
    KB = gpu_model.direction_bucket(K)
    V = 4 if KB == 1 else 2 if KB == 2 else 1
    team = 32
    while team < 256 and team * V * W < D:
        team *= 2
    ntiles = math.ceil(D / (team * V * W))
    # (lane, vector) pairs of warp 0 in tile 0: lane l's vector v starts at column l W + v team W.
    held = [min(32, max(0, math.ceil((D - v * team * W) / W))) for v in range(V)]
    pass1 = sum(held) * (K + 1) * 16
    if op == "forward":
        return pass1 + 4
    reload = (sum(held) * (K + 1) + held[0]) * 16 if ntiles > 1 else 0
    return max(pass1 + (32 * 4 if team > 32 else 0), reload)


@needs_emulation
@pytest.mark.parametrize("op", ["forward", "backward"])
@pytest.mark.parametrize("dtype,K,D", [("bfloat16", 1, 256), ("float32", 4, 1024), ("bfloat16", 4, 4096),
                                       ("float32", 16, 256)])
def test_load_bursts_match_the_kernel_structure_emulated(op, dtype, K, D):
    (launches, *_), _ = run(op, dtype, K, D, "z_per_row")
    assert launches[0]["load_burst_max"] == structural_burst(op, dtype, K, D)


@needs_emulation
def test_gpu_model_rows_emulated():
    registers = gpu_model.ptxas_registers()
    rows = gpu_model.model_rows("bfloat16", 4, 1024, "z_per_row", 8, registers)
    assert [r["kernel"] for r in rows] == ["forward", "backward", "backward_finalize"]
    for r in rows:
        for key in ("sector_efficiency", "traffic_ratio", "warps_per_sm", "bytes_in_flight_per_sm",
                    "predicted_fraction_of_copy_h100", "predicted_fraction_of_copy_h200"):
            assert r[key] is not None, key
        for gpu in ("h100", "h200"):
            assert 0 < r[f"predicted_fraction_of_copy_{gpu}"] <= 1
        assert 8 <= r["warps_per_sm"] <= 64
    # 128 registers at 256 threads: two blocks of 8 warps fit the register file.
    assert gpu_model.resident_warps(128, 256, 2048) == 16
    assert gpu_model.resident_warps(255, 256, 2048) == 8


def test_gpu_check_prints_measured_beside_predicted(tmp_path):
    # benchmarks/gpu_check.sh's last step on a benchmark CSV: each purified_ops row of a modelled
    # shape with its prediction for the GPU it names and measured / predicted; others with '-'.
    prediction = tmp_path / "model.json"
    rows = [{"kernel": k, "dtype": "bfloat16", "K": 4, "D": 1024, "z": "z_per_row",
             "predicted_fraction_of_copy_h100": p, "predicted_fraction_of_copy_h200": p / 2}
            for k, p in (("forward", 0.8), ("backward", 0.5))]
    prediction.write_text(gpu_model.json.dumps({"rows": rows}))
    csv = tmp_path / "cuda.csv"
    csv.write_text("device_name,provider,mode,dtype,N,D,K,pct_of_copy\n"
                   "NVIDIA H100 80GB HBM3,purified_ops_kernel,forward,bfloat16,32768,1024,4,60\n"
                   "NVIDIA H200,purified_ops_kernel,backward,bfloat16,32768,1024,4,20\n"
                   "NVIDIA H100 80GB HBM3,eager,forward,bfloat16,32768,1024,4,30\n"
                   "NVIDIA H100 80GB HBM3,purified_ops,forward,bfloat16,32768,16384,4,70\n")
    lines = gpu_model.compare(csv, prediction)
    assert len(lines) == 4  # the header and the three purified_ops rows
    assert lines[1].split()[-3:] == ["60%", "80%", "0.75"]
    assert lines[2].split()[-3:] == ["20%", "25%", "0.80"]
    assert lines[3].split()[-3:] == ["70%", "-", "-"]
