"""The ``purified-ops`` command line: ``info`` (version, backends, build), ``verify`` (the kernels and
gradients against the float64 reference, on this machine), ``bench`` (timings against the eager
formula and torch.compile), ``demo`` (PurifiedLearning on digits)."""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys

import torch

from . import _cli_types as arg
from ._extras import MissingExtraError


def _info(args) -> int:
    from . import __version__
    from ._extension import cuda_device_summary
    from .ops import available_backends, build_info

    build = build_info()
    info = {
        "purified_ops": __version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cpu_capability_torch": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "gpu_kernel_image": cuda_device_summary(build),  # the build's cuda_archs against this GPU
        "backends": list(available_backends()),
        "build": build,
    }
    if args.json:
        print(json.dumps(info))
    else:
        for key, value in info.items():
            if isinstance(value, dict):
                print(f"{key}:")
                for k, v in value.items():
                    print(f"  {k}: {v}")
            else:
                print(f"{key}: {value}")
    return 0


def _verify(args) -> int:
    from .testing import verify

    report = verify(device=args.device, dtypes=args.dtypes, quick=args.quick, progress=True)
    print(report.format_table())
    for row in report.failures:
        print(f"FAILED: {row.backend} {row.case} {row.dtype}: {row.detail}")
    print("bounds:")
    for note in report.notes:
        print(f"  - {note}")
    print(report.verdict)
    if args.json:
        print(report.to_json())
    return 0 if report.passed else 1


def _bench(args) -> int:
    from . import bench

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.preset == "overhead":
        from . import bench_overhead

        print(bench_overhead.format_table(bench_overhead.run(reps=args.reps or 30, csv_paths=args.csv or ())))
        return 0
    given = {k: getattr(args, k) for k in bench.DEFAULTS if getattr(args, k) is not None}
    settings = bench.sweep_settings(args.preset, given, args.dry_run)
    cases = bench.cases_for(args.device, settings["dtypes"], settings["N"], settings["D"], settings["K"],
                            settings["modes"])
    copy = "torch.add(a, b, out=c)" if args.device == "cpu" else "a device-to-device copy"
    cuda = f"; CUDA {torch.version.cuda}" if args.device == "cuda" else ""
    print(f"device: {bench.device_name(args.device)}; torch {torch.__version__}{cuda}; copy: {copy} of N x D, "
          f"same run; {len(cases)} cases", flush=True)
    max_gib = settings["max_gib"]
    rows = bench.sweep(cases, args.providers, reps=settings["reps"], csv_paths=args.csv or (),
                       budget_s=args.budget_s, max_bytes=int(max_gib * 2**30) if max_gib else None,
                       functions=bench.provider_functions(settings["compile_dynamic"]),
                       log=lambda line: print(line, flush=True))
    print(bench.format_table(rows))
    for path in args.csv or ():
        print(f"wrote {len(rows)} rows to {path}")
    return 0


def _bench_csv(text: str) -> str:
    """A CSV to upsert rows into: a new file in an existing folder, or a CSV with the key columns."""
    from .bench import CSV_KEY

    path = arg.output_file(text)
    if os.path.exists(path):
        try:
            with open(path, newline="") as f:
                header = next(csv.reader(f), [])
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise argparse.ArgumentTypeError(f"{path!r} cannot be read as a CSV ({exc})") from None
        if header and not set(CSV_KEY) <= set(header):
            raise argparse.ArgumentTypeError(f"{path!r} is not a CSV of this benchmark (its columns lack "
                                             f"{', '.join(k for k in CSV_KEY if k not in header)})")
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = arg.Parser(prog="purified-ops", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="version, backends and build information")
    info.add_argument("--json", action="store_true", help="one JSON object")
    info.set_defaults(run=_info)

    from . import testing

    verify = sub.add_parser("verify", help="check the kernels and every gradient against the float64 reference "
                                           "on this machine (exit status 1 when a check fails)")
    verify.add_argument("--device", type=arg.device("cpu", "cuda", "all"), default="all",
                        help="cpu, cuda (only where torch sees a GPU) or all: the backends to check, those whose "
                             "tensors live there (default: all found here)")
    verify.add_argument("--dtypes", nargs="+", choices=list(testing.DTYPES), help="default: all four")
    verify.add_argument("--quick", action="store_true", help="a subset of the matrix: a few seconds on a CPU")
    verify.add_argument("--json", action="store_true", help="the report as one JSON object, the last line")
    verify.set_defaults(run=_verify)

    from .bench import DTYPES, MODES, PRESETS, PROVIDERS

    bench = sub.add_parser("bench", help="time purify against the eager formula and torch.compile of it")
    bench.add_argument("--device", type=arg.device("cpu", "cuda"), default="cpu",
                       help="cpu (default) or cuda (--dry-run --device cpu checks a sweep on the CPU)")
    bench.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), help="default: float32")
    bench.add_argument("--K", nargs="+", type=arg.integer(1), help="default: 1 4")
    bench.add_argument("--N", nargs="+", type=arg.integer(1), help="default: 2048 8192")
    bench.add_argument("--D", nargs="+", type=arg.integer(1), help="default: 1024")
    bench.add_argument("--modes", nargs="+", choices=MODES, help="default: all")
    bench.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    bench.add_argument("--reps", type=arg.integer(1), help="timed repetitions per provider and case (default: 30)")
    # More threads than CPUs measure the scheduler, not the op (and torch crashes on absurd counts).
    bench.add_argument("--threads", type=arg.integer(0, arg.cpu_count()), default=0,
                       help="torch threads, at most the CPUs this process may use (default 0: torch's choice)")
    bench.add_argument("--csv", nargs="+", type=_bench_csv,
                       help="upsert the rows into these long-format CSVs, case by case (their folders must exist)")
    bench.add_argument("--preset", choices=sorted(PRESETS),
                       help="a named sweep (dtypes, N, D, K, modes, reps, max-gib, compile-dynamic; flags "
                            "given override it); 'cuda' is the GPU benchmark of benchmarks/gpu_check.sh, "
                            "'cpu-step' the CPU training step of benchmarks/run_cpu.sh")
    bench.add_argument("--dry-run", action="store_true",
                       help="the sweep at tiny sizes (N=64, D 256 and 1000, 3 reps): a check of the run, not numbers")
    bench.add_argument("--budget-s", type=arg.real(0, open_lo=True), default=None,
                       help="start no case after this many seconds (the skipped ones are listed)")
    bench.add_argument("--max-gib", type=arg.real(0, open_lo=True), default=None,
                       help="lower N so that a case's minimal full-step bytes stay within this many GiB")
    bench.add_argument("--compile-dynamic", action="store_true", default=None,
                       help="torch.compile the formula with dynamic shapes (one graph for many sizes)")
    bench.set_defaults(run=_bench)

    from .recipe import demo as _demo  # light: torch and numpy only; sklearn etc. load when it runs
    demo = sub.add_parser("demo", help="PurifiedLearning vs. plain vs. multitask on digits with a "
                                       "texture nuisance (offline, scikit-learn's digits)")
    _demo.add_arguments(demo)
    demo.set_defaults(run=_demo.main)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except MissingExtraError as exc:  # what to install, not a traceback
        print(exc, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
