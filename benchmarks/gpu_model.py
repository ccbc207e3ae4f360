"""The fused CUDA kernels' speed on a GPU, predicted from what the emulation counts.

    python benchmarks/gpu_model.py [--json PATH] [--markdown PATH] [--rows N]
    python benchmarks/gpu_model.py --compare CUDA_CSV [--prediction JSON]

Needs the emulated CUDA backend (PURIFIED_OPS_CUDA_EMU=1 python setup.py build_ext --inplace).
For each kernel of the forward and backward ops over dtype x K x D x z layout, it runs the op
through the emulation with the memory trace on (purified_ops._cuda_emu.memory_traffic) and
derives:

- sector_efficiency: over the launch's warp instructions, ideal 32-byte sectors (an
  instruction's distinct bytes / 32, rounded up) / sectors its lanes touch;
- traffic_ratio: the op's distinct bytes read and written over all its launches (the DRAM
  traffic if L2 caught every reuse) / its minimal bytes (every element of every input read once
  and of every output written once: docs/DESIGN.md section 4);
- warps_per_sm: resident warps from the kernel's registers (the sm_90 lines of
  benchmarks/results/ptxas.txt), its shared memory (dynamic, from the launch; the finalize's
  static array) and the launch's block size, by the Hopper limits below;
- bytes_in_flight_per_sm: warps_per_sm x the bytes a warp loads before it uses them (its load
  burst: the loads between two collectives or stores), averaged over the launch's bursts: a
  warp waits a DRAM latency for each burst, so it moves mean burst / latency;
- predicted_fraction_of_copy_{h100,h200}: the lesser of the in-flight bound (Little's law: the
  loads in flight per SM x SMs / DRAM latency, against the op's read share of the copy
  bandwidth) and the traffic bound (1 / traffic_ratio).

What it leaves out (docs/DESIGN.md section 4): L2 hit rates (every reuse assumed caught, every
first touch assumed to miss), DRAM page and bank effects, instruction issue limits and the
per-row serial phase (reduction, barrier, solve) during which a team has nothing in flight, the
tail of a grid that does not fill the GPU, and clocks. It is an upper bound to be tested by the
first GPU run (benchmarks/gpu_check.sh prints it beside the measured rows).
"""
import argparse
import json
import math
import os
import re
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from purified_ops import ops as ops_layer  # noqa: E402

PTXAS = ROOT / "benchmarks" / "results" / "ptxas.txt"

# The GPUs, with the source of every figure. The DRAM latency is the one figure without a
# datasheet: pointer-chase microbenchmarks put Hopper's idle DRAM latency at roughly 500-600 ns;
# under a full-bandwidth load it grows, so 650 ns is taken, to be replaced by the first GPU run's.
GPUS = {
    "h100": {
        "name": "H100 SXM5 80 GB",
        "bandwidth": 3.35e12,
        "sms": 132,
        "latency_s": 650e-9,
        "sources": {
            "bandwidth": "NVIDIA H100 Tensor Core GPU datasheet: 3.35 TB/s HBM3 (SXM)",
            "sms": "NVIDIA H100 Tensor Core GPU Architecture whitepaper: 132 SMs (SXM5)",
            "latency_s": "assumption: ~500-600 ns idle DRAM latency in pointer-chase microbenchmarks "
                         "(e.g. Chips and Cheese, 'Nvidia's H100: Funny L2, and Tons of Bandwidth', 2023), "
                         "raised for a loaded memory system",
        },
    },
    "h200": {
        "name": "H200 SXM 141 GB",
        "bandwidth": 4.8e12,
        "sms": 132,
        "latency_s": 650e-9,
        "sources": {
            "bandwidth": "NVIDIA H200 Tensor Core GPU datasheet: 4.8 TB/s HBM3e (SXM)",
            "sms": "the same GH100 die as the H100 SXM5: 132 SMs",
            "latency_s": "as for the H100 (same memory controllers; HBM3e's latency not published)",
        },
    },
}

# Hopper (sm_90) per-SM limits: CUDA C++ Programming Guide, "Compute Capabilities" table.
SM90 = {"registers": 65536, "max_warps": 64, "max_blocks": 32, "shared_bytes": 228 * 1024,
        "reserved_shared_per_block": 1024, "register_unit_per_warp": 256}

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
PTXAS_TYPE = {"bfloat16": "__nv_bfloat16", "float32": "float"}
KERNEL_SYMBOL = {"forward": "purify_forward_kernel<{t}, {kb}>", "backward": "purify_backward_kernel<{t}, {kb}>",
                 "backward_finalize": "purify_backward_finalize<{t}>"}
KS = (1, 4, 16)
DS = (256, 1024, 4096)
LAYOUTS = ("z_per_row", "z_shared_64")
SHARED_ROWS = 64


def direction_bucket(K):
    return 1 if K <= 1 else 2 if K <= 2 else 4 if K <= 4 else 8 if K <= 8 else 16


def ptxas_registers(path=PTXAS, arch="sm_90"):
    """{kernel symbol: registers per thread} from a ptxas summary (scripts/ptxas_summary.py)."""
    regs = {}
    for line in Path(path).read_text().splitlines():
        m = re.match(rf"{arch}\s+void\s+(.+?)\s+regs\s+(\d+)", line)
        if m:
            regs[m.group(1).strip()] = int(m.group(2))
    return regs


def resident_warps(registers, threads_per_block, shared_bytes):
    """Warps per SM of a kernel: the least of what registers, shared memory, warps and blocks allow."""
    warps_per_block = math.ceil(threads_per_block / 32)
    unit = SM90["register_unit_per_warp"]
    regs_per_warp = math.ceil(registers * 32 / unit) * unit
    by_regs = (SM90["registers"] // regs_per_warp) // warps_per_block
    by_smem = SM90["shared_bytes"] // (shared_bytes + SM90["reserved_shared_per_block"])
    by_warps = SM90["max_warps"] // warps_per_block
    return min(by_regs, by_smem, by_warps, SM90["max_blocks"]) * warps_per_block


def inputs(dtype, K, D, layout, rows, seed=0):
    """(x, z, grad_y) on the CPU: z per row (one z row per x row) or shared by SHARED_ROWS rows."""
    g = torch.Generator().manual_seed(seed)
    t = DTYPES[dtype] if isinstance(dtype, str) else dtype
    if layout == "z_per_row":
        x = torch.randn(rows, D, generator=g).to(t)
        z = torch.randn(rows, K, D, generator=g).to(t)
    else:
        groups = max(1, rows // SHARED_ROWS)
        x = torch.randn(groups, SHARED_ROWS, D, generator=g).to(t)
        z = torch.randn(groups, 1, K, D, generator=g).to(t)
    gy = torch.randn(x.shape, generator=g).to(t)
    return x, z, gy


def tensor_range(t):
    return (t.data_ptr(), t.data_ptr() + t.numel() * t.element_size())


def covers(ranges, span):
    """Whether the merged ranges [(begin, end)] cover the byte span [begin, end) wholly."""
    b, e = span
    if b == e:
        return True
    return any(rb <= b and e <= re_ for rb, re_ in ranges)


def traced(fn):
    """fn() run with the emulation's memory trace on: (its result, the launches recorded)."""
    module = ops_layer.emulated_cuda_module()
    module.set_memory_trace(True)
    try:
        out = fn()
        launches = module.memory_traffic()
    finally:
        module.set_memory_trace(False)
    return out, launches


def run_forward(x, z, strength=0.5, eps=1e-6):
    ops = ops_layer.emulated_cuda_ops()
    s = torch.tensor(strength, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    (y, coeff, chol), launches = traced(lambda: ops.purify_forward(x, z, s, eps))
    reads = [x, z]
    writes = [y, coeff, chol]
    return launches, reads, writes, (y, coeff, chol, s)


def run_backward(x, z, gy, strength=0.5, eps=1e-6):
    ops = ops_layer.emulated_cuda_ops()
    s = torch.tensor(strength, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    _, coeff, chol = ops.purify_forward(x, z, s, eps)
    (dx, dz, ds), launches = traced(lambda: ops.purify_backward(gy, x, z, s, coeff, chol, True))
    reads = [gy, x, z, coeff, chol]
    writes = [dx, dz, ds]
    return launches, reads, writes, (dx, dz, ds)


def minimal_bytes(reads, writes):
    """Every element of every input read once and of every output written once (the strength's
    few bytes included as a read)."""
    n = sum(t.numel() * t.element_size() for t in reads + writes)
    return n + 4


def sector_efficiency(launch):
    sectors = sum(s["sectors"] for s in launch["sites"])
    ideal = sum(s["ideal_sectors"] for s in launch["sites"])
    return ideal / sectors if sectors else 1.0


def distinct_bytes(launches):
    """Distinct bytes read plus written over the launches (ranges merged across them)."""
    def merge(ranges):
        out = []
        for b, e in sorted(ranges):
            if out and b <= out[-1][1]:
                out[-1][1] = max(out[-1][1], e)
            else:
                out.append([b, e])
        return sum(e - b for b, e in out)
    reads = [r for launch in launches for r in launch["read_ranges"]]
    writes = [r for launch in launches for r in launch["write_ranges"]]
    return merge(reads), merge(writes)


def launch_shared_bytes(launch, dtype):
    """A block's shared memory: the launch's dynamic bytes, or the finalize's static reduction array."""
    if launch["name"] == "backward_finalize":
        return 256 * 4  # __shared__ A red[kBlock], A = float for bfloat16 and float32
    return launch["dynamic_smem"]


def in_flight_bound(bytes_in_flight_per_sm, read_share, gpu):
    """Little's law: the loads' rate (in flight per SM x SMs / latency) over the op's read share of
    the copy bandwidth, at most 1."""
    need_per_sm = gpu["bandwidth"] * gpu["latency_s"] / gpu["sms"] * read_share
    return min(1.0, bytes_in_flight_per_sm / need_per_sm) if need_per_sm > 0 else 1.0


def predicted_fraction(bytes_in_flight_per_sm, read_share, traffic_ratio, gpu):
    """The lesser of the in-flight bound and the traffic bound, as a fraction of copy bandwidth."""
    return min(in_flight_bound(bytes_in_flight_per_sm, read_share, gpu), 1.0 / traffic_ratio)


def model_rows(dtype, K, D, layout, rows, registers):
    """One row per kernel of the forward and backward ops at one shape."""
    x, z, gy = inputs(dtype, K, D, layout, rows)
    out = []
    for op, (launches, reads, writes, _) in (("forward", run_forward(x, z)), ("backward", run_backward(x, z, gy))):
        minimal = minimal_bytes(reads, writes)
        read_b, write_b = distinct_bytes(launches)
        ratio = (read_b + write_b) / minimal
        read_share = read_b / (read_b + write_b)
        for launch in launches:
            symbol = KERNEL_SYMBOL[launch["name"]].format(t=PTXAS_TYPE[dtype], kb=direction_bucket(K))
            regs = registers.get(symbol)
            threads = launch["block"][0] * launch["block"][1] * launch["block"][2]
            warps = resident_warps(regs, threads, launch_shared_bytes(launch, dtype)) if regs else None
            burst = launch["load_burst_mean"]
            in_flight = warps * burst if warps else None
            row = {"kernel": launch["name"], "op": op, "dtype": dtype, "K": K, "D": D, "z": layout,
                   "rows": x.numel() // D, "registers": regs, "sector_efficiency": round(sector_efficiency(launch), 4),
                   "traffic_ratio": round(ratio, 4), "warps_per_sm": warps,
                   "bytes_in_flight_per_warp": round(burst, 1),
                   "bytes_in_flight_per_sm": round(in_flight) if in_flight is not None else None}
            for key, gpu in GPUS.items():
                row[f"predicted_fraction_of_copy_{key}"] = (
                    round(predicted_fraction(in_flight, read_share, ratio, gpu), 3) if in_flight is not None else None)
            row["limited_by_h100"] = (
                None if in_flight is None else
                "traffic" if 1.0 / ratio < in_flight_bound(in_flight, read_share, GPUS["h100"]) else "bytes in flight")
            out.append(row)
    return out


GOALS = {("forward", False): 0.90, ("backward", False): 0.80, ("forward", True): 0.80, ("backward", True): 0.70}


def goal(row):
    """The prediction's goal for a row (forward/backward fused kernels, K <= 4 or 16, D >= 1024), or None."""
    if row["kernel"] not in ("forward", "backward") or row["D"] < 1024:
        return None
    return GOALS[(row["kernel"], row["K"] > 4)]


def preamble(rows, rows_per_case):
    """What the table is, how it was made, the GPU figures with their sources, what it leaves out."""
    gpus = "\n".join(f"- {g['name']}: {g['bandwidth'] / 1e12:.2f} TB/s ({g['sources']['bandwidth']}), {g['sms']} SMs "
                     f"({g['sources']['sms']}), DRAM latency {g['latency_s'] * 1e9:.0f} ns ({g['sources']['latency_s']})."
                     for g in GPUS.values())
    goals = [r for r in rows if goal(r) is not None]
    short = [r for r in goals if r["predicted_fraction_of_copy_h100"] < goal(r)]
    return f"""# The CUDA kernels' speed, predicted from the emulation

`python benchmarks/gpu_model.py --json benchmarks/results/gpu_model.json --markdown benchmarks/results/gpu_model.md`
(the emulated backend built; {rows_per_case} rows of x per case: the counts scale with the rows, the
ratios hardly). The method and what it leaves out: docs/DESIGN.md section 4. In short: sector efficiency and
traffic ratio are counted from every lane's global access in the emulation; warps per SM come from
the sm_90 registers in `benchmarks/results/ptxas.txt` and the launch's shared memory; bytes in flight
per warp are the warps' measured load bursts (their mean: each costs a DRAM latency); the prediction is the lesser of
Little's law's in-flight bound and 1 / traffic ratio, as a fraction of copy bandwidth. The model
leaves out L2 hit rates, DRAM page effects, instruction issue limits, the per-row serial phase
(reduction, barriers, solve), tail effects and clocks: an upper bound, tested by the first GPU run
(`benchmarks/gpu_check.sh` prints measured / predicted).

{gpus}

Goals (H100, D >= 1024): forward 90% and backward 80% of copy at K <= 4, 80% and 70% at K 16.
{len(goals) - len(short)} of {len(goals)} goal rows are predicted to meet them.
{shortfalls(short)}
A backward_finalize row is the second launch of the backward op (the dz partials' sum where z is
shared, and ds); its traffic ratio is the op's.

"""


def shortfalls(short):
    """The goal rows predicted short, with what limits each."""
    if not short:
        return ""
    lines = ["Predicted short of the goal (H100):", ""]
    for r in short:
        lines.append(f"- {r['kernel']} {r['dtype']} K {r['K']} D {r['D']} {r['z']}: "
                     f"{r['predicted_fraction_of_copy_h100']:.1%} < {goal(r):.0%}, limited by {r['limited_by_h100']} "
                     f"({r['bytes_in_flight_per_sm']} B in flight per SM, traffic ratio {r['traffic_ratio']:.3f})")
    lines += ["", "Why: with z shared, the backward writes each work item's dz partial (K x D in the accumulate "
              "type) and its finalize reads them back (the traffic above 1, largest for bfloat16, whose partials "
              "are twice its elements' width); and after a z row's first row a warp's bursts are one row's "
              "vector of grad_y or x, or one direction's partial read before it is added to and stored (a round "
              "trip per direction and row). The bursts are counted in source order: the compiler may hoist "
              "those loads above the stores to other directions' partials (`__restrict__`), which the model "
              "does not see. Not yet tried: keeping an item's partials in registers where K and V allow, or "
              "loading all K partials of a vector before the first store."]
    return "\n".join(lines) + "\n"


def markdown(rows):
    head = ("| kernel | dtype | K | D | z | regs | sector eff. | traffic ratio | warps/SM | B in flight/warp "
            "| B in flight/SM | H100 | H200 | goal (H100) |")
    lines = [head, "|" + " --- |" * 14]
    for r in rows:
        g = goal(r)
        mark = "" if g is None else (f"{g:.0%} met" if r["predicted_fraction_of_copy_h100"] >= g else f"{g:.0%} SHORT")
        lines.append(
            f"| {r['kernel']} | {r['dtype']} | {r['K']} | {r['D']} | {r['z']} | {r['registers']} "
            f"| {r['sector_efficiency']:.3f} | {r['traffic_ratio']:.3f} | {r['warps_per_sm']} "
            f"| {r['bytes_in_flight_per_warp']:.0f} | {r['bytes_in_flight_per_sm']} "
            f"| {r['predicted_fraction_of_copy_h100']:.0%} | {r['predicted_fraction_of_copy_h200']:.0%} | {mark} |")
    return "\n".join(lines) + "\n"


PREDICTION = ROOT / "benchmarks" / "results" / "gpu_model.json"


def compare(csv_path, prediction=PREDICTION):
    """Lines of the measured CUDA benchmark rows (purified-ops bench --preset cuda, z per row) beside
    the model's prediction for the same kernel, dtype, K and D, on the GPU the row names, and the
    ratio measured / predicted. Rows the model has no shape for show '-'."""
    import csv

    doc = json.loads(Path(prediction).read_text())
    predicted = {(r["kernel"], r["dtype"], r["K"], r["D"]): r for r in doc["rows"] if r["z"] == "z_per_row"}
    lines = [f"{'provider':<20} {'mode':<9} {'dtype':<9} {'N':>6} {'D':>6} {'K':>3} {'% of copy':>9} "
             f"{'predicted':>9} {'measured/predicted':>18}"]
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            if not row["provider"].startswith("purified_ops") or row["mode"] not in ("forward", "backward"):
                continue
            gpu = "h200" if "H200" in row["device_name"].upper() else "h100"
            r = predicted.get((row["mode"], row["dtype"], int(row["K"]), int(row["D"])))
            measured = float(row["pct_of_copy"]) / 100
            pred = r[f"predicted_fraction_of_copy_{gpu}"] if r else None
            lines.append(f"{row['provider']:<20} {row['mode']:<9} {row['dtype']:<9} {row['N']:>6} {row['D']:>6} "
                         f"{row['K']:>3} {measured:>9.0%} " + (f"{pred:>9.0%} {measured / pred:>18.2f}" if pred
                                                                 else f"{'-':>9} {'-':>18}"))
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write the rows here as JSON")
    ap.add_argument("--markdown", help="write the table here (Markdown)")
    ap.add_argument("--rows", type=int, default=64, help="x rows per case (the counts scale with them)")
    ap.add_argument("--ptxas", default=str(PTXAS), help="ptxas summary with the sm_90 kernels")
    ap.add_argument("--compare", metavar="CUDA_CSV", help="print measured CUDA benchmark rows beside the prediction")
    ap.add_argument("--prediction", default=str(PREDICTION), help="the model's JSON (for --compare)")
    args = ap.parse_args(argv)
    if args.compare:
        print("\n".join(compare(args.compare, args.prediction)))
        return
    if ops_layer.emulated_cuda_module() is None:
        sys.exit("the emulated CUDA backend is not built: PURIFIED_OPS_CUDA_EMU=1 python setup.py build_ext --inplace")
    torch.set_num_threads(1)
    registers = ptxas_registers(args.ptxas)
    rows = []
    for dtype in DTYPES:
        for K in KS:
            for D in DS:
                for layout in LAYOUTS:
                    rows.extend(model_rows(dtype, K, D, layout, args.rows, registers))
    doc = {"gpus": GPUS, "sm90_limits": SM90, "ptxas": os.path.relpath(args.ptxas, ROOT), "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
    table = markdown(rows)
    if args.markdown:
        Path(args.markdown).write_text(preamble(rows, args.rows) + table)
    print(table, end="")


if __name__ == "__main__":
    main()
