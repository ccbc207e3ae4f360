"""The float64 truth and docs/DESIGN.md's accuracy bounds, shared by the tests; their one owner is
purified_ops.testing (also behind `purified-ops verify`)."""
from purified_ops.testing import (TOLERANCE, conditioned_row_bound, gram_condition, rank_deficient_bound, rel_err,  # noqa: F401
                                  row_err, truth, truth_rank_deficient)
