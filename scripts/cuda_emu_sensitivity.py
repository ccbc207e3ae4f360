"""Sensitivity of the emulated CUDA tests: plants known bugs, one at a time, in a copy of the
kernel sources, rebuilds the emulated backend there and runs a subset of tests/test_cuda.py and
tests/test_memory_traffic.py through it. Fails unless the unplanted copy passes and every planted bug is caught (a failing
test, a launch error from the emulation's checks, or a sanitizer abort).

    python scripts/cuda_emu_sensitivity.py [--keep DIR]

Needs what PURIFIED_OPS_CUDA_EMU=1 needs (the CUDA toolkit's headers); bugs marked asan also
need libasan (gcc). Run from the repository root; the working tree is never modified.
"""
import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time

KERNELS = "csrc/cuda/purify_kernels.cuh"
PACKS = "csrc/cuda/packs.cuh"
TEAM = "csrc/cuda/team_layout.cuh"
WARP = "csrc/cuda/warp_reductions.cuh"
FACTOR = "csrc/cuda/factor_solve.cuh"

# (name, build: "1" plain or "asan", file, text, replacement, what should catch it)
BUGS = [
    ("team sync after the solve removed", "1", KERNELS,
     "            if (dir < K) global_store(coeff_data + row * K + dir, c);\n          }\n"
     "          sm[S::flag(team.warps)] = ok || scaled ? A(0) : A(1);\n        }\n      }\n      team.sync();",
     "            if (dir < K) global_store(coeff_data + row * K + dir, c);\n          }\n"
     "          sm[S::flag(team.warps)] = ok || scaled ? A(0) : A(1);\n        }\n      }",
     "wrong y: threads read c before warp 0 wrote it"),
    ("named barrier count halved", "1", TEAM,
     "named_barrier_sync(id + 1, size);", "named_barrier_sync(id + 1, size / 2);",
     "warp 0 passes the barrier before the team's other warps added their sums"),
    ("__syncwarp before the lanes read the pivot order removed", "1", FACTOR,
     "    if (lane == 0) order_sm[t] = A(p);\n  }\n  __syncwarp();",
     "    if (lane == 0) order_sm[t] = A(p);\n  }",
     "pivoting test: a lane reads a stale pivot order (finite shared-memory fill, or a team's previous item)"),
    ("warp butterfly one step short", "1", WARP,
     "for (int off = 16; off >= 1; off >>= 1) v += __shfl_xor_sync(kFull, v, off);",
     "for (int off = 16; off >= 2; off >>= 1) v += __shfl_xor_sync(kFull, v, off);", "wrong ds"),
    ("finalize skips the last dz partial", "1", KERNELS,
     "for (int64_t c = 0; c < chunks; ++c) sum +=", "for (int64_t c = 0; c + 1 < chunks; ++c) sum +=",
     "wrong dz of a z row shared by several work items"),
    ("shuffle source outside the mask", "1", FACTOR,
     "const A d = __shfl_sync(kFull, rem, p);", "const A d = __shfl_sync(0x0000ffffu, rem, p + 16);",
     "emulation check: the mask leaves out calling lanes / the source lane"),
    ("dynamic shared memory 4 bytes short", "asan", KERNELS,
     "return sizeof(A) * (kBlock / team) * TeamSmem<KB>::elems(team / 32);",
     "return sizeof(A) * (kBlock / team) * TeamSmem<KB>::elems(team / 32) - 4;",
     "AddressSanitizer: the last team's last slot is past the launch's shared memory"),
    ("vector store tail off by one", "asan", PACKS,
     "global_store_if(col < D, reinterpret_cast<Pack<T>*>(row + col), p);",
     "global_store_if(col <= D, reinterpret_cast<Pack<T>*>(row + col), p);",
     "AddressSanitizer: a 16-byte store past the end of the output"),
    ("K > 16 factor kernel misses the last matrix", "1", "csrc/cuda/purify_factor_grams.cu",
     "if (i < count) cholesky_inplace", "if (i + 1 < count) cholesky_inplace", "wrong y for K > 16"),
    ("one named barrier id for every team", "1", TEAM,
     "named_barrier_sync(id + 1, size);", "named_barrier_sync(1, size);",
     "emulation check: the barrier's phases completed by different teams' warps (on a GPU, by whichever "
     "warps arrive first)"),
    ("16-bit outputs truncated", "1", PACKS,
     "return __bfloat16_as_ushort(__float2bfloat16_rn(v));\n"
     "  } else if constexpr (std::is_same<T, __half>::value) {\n"
     "    return __half_as_ushort(__float2half_rn(v));",
     "return __bfloat16_as_ushort(__float2bfloat16_rz(v));\n"
     "  } else if constexpr (std::is_same<T, __half>::value) {\n"
     "    return __half_as_ushort(__float2half_rz(v));",
     "rounding test: outputs biased toward zero by half an ulp on average"),
    ("a thread's vectors side by side (lane-strided, uncoalesced accesses)", "1", TEAM,
     "int64_t col(int64_t c0, int v) const { return c0 + v * team.size * W; }",
     "int64_t col(int64_t c0, int v) const { return c0 + (team.tid * (V - 1) + v) * W; }",
     "memory-traffic test: sector efficiency below 0.95 (the results stay right)"),
]

TESTS = ("emulated and (broadcast_patterns or vector_path or large_k or broadcast_z_shared and float32 and 512 "
         "or round_to_nearest or rows_of_one_item_at_different_scales and 16 or pivoting "
         "or large_directions and rows and not long and float32 and 4 "
         "or shapes_k_buckets_and_tiles and (1000-1- or 1000-4- or 64-16- or 4100-16-) and (float32 or float64) "
         "or coalesced_and_complete and (float32-1-256 or bfloat16-16-1024) and z_per_row)")


def build(root, mode):
    # Unoptimized plain builds: each planted bug recompiles every kernel file, and -O0 compiles
    # them 4x faster than -O2 while the few tests run on each stay short.
    env = dict(os.environ, PURIFIED_OPS_CUDA_EMU=mode, PURIFIED_OPS_CUDA_EMU_OPT="-O0",
               MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
    r = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace", "-q"], cwd=root, env=env,
                       capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"build ({mode}) failed in {root}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")


def run_tests(root, mode):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("PURIFIED_OPS_CUDA_EMU", None)
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "tests/test_cuda.py",
           "tests/test_memory_traffic.py", "-k", TESTS]
    if mode == "asan":
        cmd = [os.path.join(root, "scripts", "with_asan"), *cmd]
    r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    return r.returncode, (r.stdout + r.stderr)[-1500:]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keep", help="work in this directory and keep it (default: a temporary one)")
    args = ap.parse_args()
    src = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
    work = os.path.abspath(args.keep) if args.keep else tempfile.mkdtemp(prefix="purify-sensitivity-")
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=src, capture_output=True,
                           text=True, check=True).stdout.split()
    for f in files:
        if os.path.isfile(os.path.join(src, f)):
            os.makedirs(os.path.dirname(os.path.join(work, f)) or work, exist_ok=True)
            shutil.copy2(os.path.join(src, f), os.path.join(work, f))
    # The package's own modules, built from sources no planted bug touches (csrc/cuda is not in
    # the CPU build): copied, so that the copy rebuilds only the emulated module.
    for so in glob.glob(os.path.join(src, "purified_ops", "_C*.so")) + glob.glob(
            os.path.join(src, "purified_ops", "_cpu_*.so")):
        shutil.copy2(so, os.path.join(work, "purified_ops"))
    failures = []
    try:
        for mode in ("1", "asan"):
            t0 = time.time()
            build(work, mode)
            code, out = run_tests(work, mode)
            print(f"[{mode}] unplanted sources: {'pass' if code == 0 else 'FAIL'} ({time.time() - t0:.0f} s)", flush=True)
            if code != 0:
                failures.append(f"unplanted sources fail ({mode}):\n{out}")
                continue
            for name, bug_mode, path, old, new, why in BUGS:
                if bug_mode != mode:
                    continue
                t0 = time.time()
                full = os.path.join(work, path)
                text = open(full).read()
                if text.count(old) != 1:
                    failures.append(f"{name}: the text to replace is not in {path} exactly once (sources changed?)")
                    continue
                open(full, "w").write(text.replace(old, new))
                try:
                    build(work, mode)
                    code, out = run_tests(work, mode)
                finally:
                    open(full, "w").write(text)
                caught = code != 0
                print(f"[{mode}] {name}: {'caught' if caught else 'NOT CAUGHT'} ({time.time() - t0:.0f} s; {why})",
                      flush=True)
                if not caught:
                    failures.append(f"{name} not caught")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    if failures:
        sys.exit("\n".join(failures))
    print("every planted bug was caught")


if __name__ == "__main__":
    main()
