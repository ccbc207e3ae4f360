"""CUDA architectures: the ones a build compiles by default, and which of a build's kernel images
serves a GPU of a given compute capability.

Standard library only: setup.py loads this file by its path at build time (before the package is
importable), purified_ops._extension at run time.

Images are named as nvcc's ``-gencode ... code=`` names them: ``sm_86`` a cubin (machine code for
that architecture), ``compute_120`` PTX (compiled by the driver for the GPU it runs on), with the
suffix ``a`` (arch-specific: that one capability) or ``f`` (family-specific). Archs are named as
``TORCH_CUDA_ARCH_LIST`` names them: ``8.6``, ``9.0a``, ``12.0+PTX``. A capability is the pair
(major, minor) of ``torch.cuda.get_device_capability()``.
"""
from __future__ import annotations

import re
from typing import Iterable, NamedTuple, Sequence

# Built by default wherever nvcc supports them, in addition to the archs torch was built for:
# T4 (7.5), A100 / A30 (8.0), RTX 30 / A10 / A40 (8.6), L4 / L40 / RTX 40 (8.9), H100 / H200 (9.0),
# B200 / GB200 (10.0; its cubin also runs on B300, 10.3), RTX 50 / RTX PRO Blackwell (12.0; also
# DGX Spark, 12.1).
MINIMUM_ARCHS = ("7.5", "8.0", "8.6", "8.9", "9.0", "10.0", "12.0")

_IMAGE = re.compile(r"(sm|compute)_(\d+)(\d)([af]?)")
_ARCH = re.compile(r"(\d+)\.(\d)([af]?)")


class Image(NamedTuple):
    ptx: bool
    major: int
    minor: int
    suffix: str  # "", "a" or "f"

    @property
    def name(self) -> str:
        return f"{'compute' if self.ptx else 'sm'}_{self.major}{self.minor}{self.suffix}"

    @property
    def arch(self) -> str:
        return f"{self.major}.{self.minor}{self.suffix}"


def parse_image(name: str) -> Image:
    m = _IMAGE.fullmatch(name)
    if m is None:
        raise ValueError(f"not a CUDA image name (sm_XY or compute_XY): {name!r}")
    return Image(m.group(1) == "compute", int(m.group(2)), int(m.group(3)), m.group(4))


def parse_arch(arch: str) -> Image:
    """A TORCH_CUDA_ARCH_LIST entry without "+PTX" ("8.6", "9.0a") as the cubin it compiles to."""
    m = _ARCH.fullmatch(arch)
    if m is None:
        raise ValueError(f"not a CUDA arch (X.Y): {arch!r}")
    return Image(False, int(m.group(1)), int(m.group(2)), m.group(3))


def _order(image: Image):
    return image.major, image.minor, image.suffix, image.ptx


def sort_images(names: Iterable[str]) -> list[str]:
    """Oldest arch first, a cubin before the PTX of its arch; no repeats."""
    return [i.name for i in sorted({parse_image(n) for n in names}, key=_order)]


def serves(image: str, capability: Sequence[int]) -> bool:
    """Whether the driver runs this image on a GPU of this capability. A cubin runs on its major
    version from its minor up (sm_80 on 8.0, 8.6, 8.7, 8.9; sm_100 on 10.0 and 10.3), and so does
    "f" (family) PTX; other PTX runs on its capability and every later one (the driver compiles
    it). An "a" image runs on its own capability only."""
    i = parse_image(image)
    major, minor = capability
    if i.suffix == "a":
        return (i.major, i.minor) == (major, minor)
    if i.ptx and not i.suffix:
        return (i.major, i.minor) <= (major, minor)
    return i.major == major and i.minor <= minor


def image_for(capability: Sequence[int], images: Iterable[str]) -> str | None:
    """The image of `images` the driver runs on a GPU of `capability`, as it chooses: the newest
    cubin that runs there, else the newest PTX that does (compiled when a kernel is first loaded);
    None when none does ("no kernel image is available for execution on the device")."""
    usable = [parse_image(n) for n in images if serves(n, capability)]
    if not usable:
        return None
    return max(usable, key=lambda i: (not i.ptx, i.major, i.minor)).name


def images_of_gencode(flags: Iterable[str]) -> list[str]:
    """The images that nvcc's ``-gencode=arch=compute_XY,code=...`` flags produce (``code`` may
    be one name or a bracketed list), sorted."""
    names = []
    for flag in flags:
        m = re.fullmatch(r"-gencode[= ]arch=compute_\w+,code=\[?([\w,]+)\]?", flag)
        if m is None:
            raise ValueError(f"not a -gencode flag: {flag!r}")
        names += m.group(1).split(",")
    return sort_images(names)


def gencode_flags(arch_list: str) -> list[str]:
    """nvcc's -gencode flags for a TORCH_CUDA_ARCH_LIST of X.Y entries (as :func:`default_arch_list`
    writes it), as torch writes them: a cubin per entry, and PTX for those with "+PTX"."""
    flags = []
    for entry in arch_list.split(";"):
        image = parse_arch(entry.removesuffix("+PTX"))
        code = f"{image.major}{image.minor}{image.suffix}"
        flags.append(f"-gencode=arch=compute_{code},code=sm_{code}")
        if entry.endswith("+PTX"):
            flags.append(f"-gencode=arch=compute_{code},code=compute_{code}")
    return flags


def default_arch_list(torch_archs: Iterable[str], nvcc_codes: Iterable[str]) -> str:
    """TORCH_CUDA_ARCH_LIST of a default build: the archs torch was built for (``torch_archs``:
    ``torch.cuda.get_arch_list()``, e.g. ``sm_75 ... sm_120``, PTX entries counting as their arch)
    and :data:`MINIMUM_ARCHS`, those that nvcc compiles cubins for (``nvcc_codes``: ``nvcc
    --list-gpu-code``), oldest first, with "+PTX" on the newest that is not arch-specific, so that
    GPUs newer than every cubin run its PTX. Raises ValueError when nvcc compiles none of them."""
    compilable = {parse_image(c)._replace(ptx=False) for c in nvcc_codes if c.startswith("sm_")}
    wanted = {parse_image(a)._replace(ptx=False) for a in torch_archs} | {parse_arch(a) for a in MINIMUM_ARCHS}
    chosen = sorted(wanted & compilable, key=_order)
    if not chosen:
        raise ValueError(f"nvcc compiles none of the archs wanted ({', '.join(sorted(i.arch for i in wanted))}); "
                         f"it lists {', '.join(sorted(i.name for i in compilable)) or 'none'}")
    ptx = max((i for i in chosen if i.suffix != "a"), key=_order, default=None)
    return ";".join(i.arch + ("+PTX" if i == ptx else "") for i in chosen)
