"""The ``purified-ops`` command line: ``info`` (version, backends, build), ``demo`` (PurifiedLearning on digits)."""
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="purified-ops", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="version, backends and build information")
    info.add_argument("--json", action="store_true", help="one JSON object")
    info.set_defaults(run=_info)
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
