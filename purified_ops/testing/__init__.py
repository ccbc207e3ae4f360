"""Testing utilities: docs/DESIGN.md's accuracy bounds, the float64 evaluation of the reference they
are measured against, and :func:`verify`, the check of the kernels and gradients that a user runs
on their own machine (``purified-ops verify``). The repository's tests take their bounds from here.

A *backend* is a pair of raw ops with the schemas of ``purified_ops::purify_forward`` and
``purified_ops::purify_backward`` plus the device its tensors live on (:class:`Backend`);
:func:`verify` checks each one available on the chosen device, or the ones it is given.

- :mod:`.bounds`: the bounds, the error measures, :func:`reference_in_float64`;
- :mod:`.output_rounding`: the check that 16-bit outputs round to nearest even;
- :mod:`.backends`: the backends found here (:func:`discover_backends`);
- :mod:`.matrix`: the cases :func:`verify` runs, and :func:`verify`;
- :mod:`.report`: what it returns (:class:`VerifyReport`, :class:`Row`).
"""
from .backends import Backend, discover_backends
from .bounds import (DTYPES, ROW_TOLERANCE, TOLERANCE, conditioned_row_bound, dependent_row_bound, error_scales,
                     gram_condition, magnitude_errors, rank_deficient_bound, rank_deficient_in_float64,
                     reference_in_float64, regularized_gram, rel_err, row_err, span_condition, sum_err,
                     unit_roundoff)
from .matrix import verify
from .report import Row, VerifyReport
from .output_rounding import ROUNDING_BIAS, Rounding, rounding, rounding_of_16bit_outputs

__all__ = ["TOLERANCE", "ROW_TOLERANCE", "reference_in_float64", "rel_err", "sum_err", "unit_roundoff",
           "regularized_gram", "gram_condition", "conditioned_row_bound", "error_scales", "span_condition",
           "dependent_row_bound", "rank_deficient_in_float64", "rank_deficient_bound", "row_err", "magnitude_errors",
           "Backend", "Row", "VerifyReport", "discover_backends", "verify", "DTYPES",
           "ROUNDING_BIAS", "Rounding", "rounding", "rounding_of_16bit_outputs"]
