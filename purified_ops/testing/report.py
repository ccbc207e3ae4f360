"""The report of :func:`purified_ops.testing.verify`: one row per check, the table, the verdict, JSON."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field

import torch

from .. import _extension
from ..ops import build_info

@dataclass
class Row:
    """One line of the table: a check of one backend on one case and dtype."""

    backend: str
    case: str
    dtype: str
    error: float | None       # worst error over what the case covers; None for pass/fail checks
    tolerance: float | None   # the bound it is held to (the notes say which bound)
    passed: bool
    detail: str = ""          # where the worst error is, or why it failed


@dataclass
class VerifyReport:
    device: str
    dtypes: list[str]
    quick: bool
    backends: list[str]
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    cpu_capability: str | None = None  # the CPU kernels' capability here (DEFAULT, AVX2, AVX512)

    @property
    def passed(self) -> bool:
        return bool(self.rows) and all(r.passed for r in self.rows)

    @property
    def failures(self) -> list[Row]:
        return [r for r in self.rows if not r.passed]

    @property
    def verdict(self) -> str:
        checked = f"{len(self.rows)} checks of {', '.join(self.backends) or f'no backend on {self.device}'}"
        if self.passed:
            return f"verify: PASS: {checked} ({', '.join(self.dtypes)}) in {self.seconds:.1f} s"
        bad = self.failures
        named = "; ".join(f"{r.backend} {r.case} {r.dtype}" + (f" ({r.detail})" if r.detail else "") for r in bad[:5])
        more = f"; and {len(bad) - 5} more" if len(bad) > 5 else ""
        return f"verify: FAIL: {len(bad)} of {checked} failed: {named}{more}"

    def to_dict(self) -> dict:
        def finite(v):  # strict JSON has no NaN or Infinity
            return v if v is None or math.isfinite(v) else str(v)

        rows = [{**dataclasses.asdict(r), "error": finite(r.error), "tolerance": finite(r.tolerance)}
                for r in self.rows]
        return {"passed": self.passed, "verdict": self.verdict, "device": self.device, "dtypes": self.dtypes,
                "quick": self.quick, "backends": self.backends, "cpu_capability": self.cpu_capability,
                "seconds": round(self.seconds, 3),
                "notes": self.notes, "rows": rows}

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    def format_table(self) -> str:
        def num(v):
            return "-" if v is None else f"{v:.2e}"

        head = ("backend", "case", "dtype", "worst rel. error", "tolerance", "pass", "worst at / why")
        body = [(r.backend, r.case, r.dtype, num(r.error), num(r.tolerance), "ok" if r.passed else "FAIL", r.detail)
                for r in self.rows]
        widths = [max(len(str(c)) for c in col) for col in zip(head, *body)]
        line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
        return "\n".join([line(head), line(["-" * w for w in widths])] + [line(b) for b in body])


def cuda_image_row() -> Row | None:
    """Whether an image of the CUDA build (its cuda_archs) serves the current GPU, as a row of the
    report; None without a CUDA build or a visible GPU."""
    info = build_info()
    summary = _extension.cuda_device_summary(info)
    if summary is None:
        return None
    served = _extension.cuda_device(info["cuda_archs"]).image is not None
    return Row("cuda", "kernel image for this GPU", "-", None, None, served, summary)


def dtype_name(dtype):
    return str(dtype).removeprefix("torch.")
