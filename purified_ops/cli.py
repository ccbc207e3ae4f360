"""The ``purified-ops`` command line: ``info`` (version, backends, build), ``bench`` (timings against
the eager formula and torch.compile), ``demo`` (PurifiedLearning on digits)."""
from __future__ import annotations

import argparse
import json
import platform
import sys

import torch


def _info(args) -> int:
    from . import __version__
    from .ops import available_backends, build_info

    info = {
        "purified_ops": __version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cpu_capability_torch": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "backends": list(available_backends()),
        "build": build_info(),
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


def _bench(args) -> int:
    from . import bench

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("purified-ops bench: no CUDA device here", file=sys.stderr)
        return 2
    cases = bench.cases_for(args.device, args.dtypes, args.N, args.D, args.K, args.modes)
    results = bench.measure(cases, args.providers, reps=args.reps, progress=not args.no_progress)
    rows = bench.to_rows(results)
    copy = "torch.add(a, b, out=c)" if args.device == "cpu" else "a device-to-device copy"
    print(f"device: {bench.device_name(args.device)}; torch {torch.__version__}; copy: {copy} of N x D, same run")
    print(bench.format_table(rows))
    if args.csv:
        bench.upsert_csv(args.csv, rows)
        print(f"wrote {len(rows)} rows to {args.csv}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="purified-ops", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="version, backends and build information")
    info.add_argument("--json", action="store_true", help="one JSON object")
    info.set_defaults(run=_info)

    from .bench import DTYPES, MODES, PROVIDERS

    bench = sub.add_parser("bench", help="time purify against the eager formula and torch.compile of it")
    bench.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    bench.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["float32"])
    bench.add_argument("--K", nargs="+", type=int, default=[1, 4])
    bench.add_argument("--N", nargs="+", type=int, default=[2048, 8192])
    bench.add_argument("--D", nargs="+", type=int, default=[1024])
    bench.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    bench.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    bench.add_argument("--reps", type=int, default=30, help="timed repetitions per provider and case")
    bench.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    bench.add_argument("--csv", help="append (upsert) the rows to this long-format CSV")
    bench.add_argument("--no-progress", action="store_true")
    bench.set_defaults(run=_bench)

    from . import demo as _demo  # light: torch and numpy only; sklearn etc. load when it runs
    demo = sub.add_parser("demo", help="PurifiedLearning vs. plain vs. multitask on digits with a "
                                       "texture nuisance (offline, scikit-learn's digits)")
    _demo.add_arguments(demo)
    demo.set_defaults(run=_demo.main)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
