"""The float64 truth and docs/DESIGN.md's accuracy bounds, shared by the tests; their one owner is
purified_ops.testing (also behind `purified-ops verify`)."""
from purified_ops.testing import (TOLERANCE, conditioned_row_bound, dependent_row_bound, gram_condition,  # noqa: F401
                                  rank_deficient_bound, rel_err, row_err, span_condition, truth,
                                  truth_rank_deficient)
