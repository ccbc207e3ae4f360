"""Prints requirements from pyproject.toml, the one place they are listed, one a line, for
`pip install -r`: `build` (the build-system requirements, for builds without isolation),
`run` (the package's dependencies) or the name of an extra (test, bench, demo, dist).

Usage: python scripts/requirements.py build run test ... > reqs.txt"""
import pathlib
import sys

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

PYPROJECT = pathlib.Path(__file__).resolve().parent.parent / "pyproject.toml"


def requirements(groups):
    meta = tomllib.loads(PYPROJECT.read_text())
    lists = {"build": meta["build-system"]["requires"], "run": meta["project"]["dependencies"],
             **meta["project"]["optional-dependencies"]}
    unknown = [g for g in groups if g not in lists]
    if unknown:
        raise SystemExit(f"requirements.py: unknown group(s) {unknown}; known: {', '.join(lists)}")
    return list(dict.fromkeys(req for g in groups for req in lists[g]))


if __name__ == "__main__":
    print("\n".join(requirements(sys.argv[1:])))
