"""Argument types of the ``purified-ops`` commands: each value is checked while the command line is
parsed, before any work starts, and a bad one ends the command with exit status 2 and one line
that names the argument (:class:`Parser`), never a traceback."""
from __future__ import annotations

import argparse
import math
import os

import torch


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, ``prog: error: message (see prog --help)``,
    without the usage block; its subcommands' parsers are of this class too."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _bounds(lo, hi) -> str:
    if hi is None:
        return f">= {lo}"
    return f"from {lo} to {hi}"


def integer(lo: int, hi: int | None = None):
    """An int in [lo, hi] (hi None: no upper bound)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number {_bounds(lo, hi)}, got {text!r}") from None
        if value < lo or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"must be {_bounds(lo, hi)}, got {value}")
        return value

    parse.__name__ = "integer"  # argparse names the type in some messages
    return parse


def cpu_count() -> int:
    """The CPUs this process may run on (its affinity where the OS tells it)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def real(lo: float, hi: float | None = None, *, open_lo: bool = False):
    """A finite float in [lo, hi] ((lo, hi] with open_lo; hi None: no upper bound)."""
    lower = f"> {lo}" if open_lo else f">= {lo}"
    wanted = lower if hi is None else f"{lower} and <= {hi}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number {wanted}, got {text!r}") from None
        if not math.isfinite(value) or value < lo or (open_lo and value == lo) or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"must be a finite number {wanted}, got {text}")
        return value

    parse.__name__ = "real"
    return parse


def output_file(text: str) -> str:
    """A file to write: its folder must exist and be writable (no folders are made), and the path
    must not be a folder."""
    folder = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"the folder of {text!r} does not exist (it is not created)")
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a folder, not a file")
    if not os.access(folder, os.W_OK) or (os.path.exists(text) and not os.access(text, os.W_OK)):
        raise argparse.ArgumentTypeError(f"{text!r} is not writable here")
    return text


def device(*names: str):
    """A device name among `names` ("cpu", "cuda", "auto", "all"; "cuda:N" where "cuda:N" is listed);
    CUDA only where torch sees a GPU (and N below their count)."""

    def parse(text: str) -> str:
        kind, _, index = text.partition(":")
        if text not in names and not ("cuda:N" in names and kind == "cuda" and index.isdigit()):
            raise argparse.ArgumentTypeError(f"must be one of {', '.join(names)}, got {text!r}")
        if kind == "cuda":
            if not torch.cuda.is_available():
                raise argparse.ArgumentTypeError(f"{text!r}: no CUDA device here (torch {torch.__version__}, "
                                                 f"CUDA {torch.version.cuda or 'not built'})")
            if index and int(index) >= torch.cuda.device_count():
                raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA "
                                                 "device(s)")
        return text

    parse.__name__ = "device"
    return parse



def image_file(text: str) -> str:
    """An :func:`output_file` whose extension names an image format matplotlib writes (png, pdf,
    svg, ...). Without matplotlib the format is not checked: the command that plots says what to
    install before it starts."""
    text = output_file(text)
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        return text
    formats = FigureCanvasBase.get_supported_filetypes()
    extension = os.path.splitext(text)[1].removeprefix(".").lower()
    if extension not in formats:
        raise argparse.ArgumentTypeError(f"{text!r}: its extension must name an image format matplotlib "
                                         f"writes ({', '.join(sorted(formats))})")
    return text
