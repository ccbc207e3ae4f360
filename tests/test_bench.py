"""The benchmark machinery (not speed): byte model, timed steps, CSV upsert, table, plots."""
import csv
import subprocess
import sys
from pathlib import Path

import torch

from purified_ops import bench


def test_minimal_bytes_follow_design():
    case = bench.Case("cpu", "bfloat16", N=10, D=8, K=3, mode="forward")
    assert case.minimal_bytes() == (2 + 3) * 10 * 8 * 2
    assert bench.Case("cpu", "float32", 10, 8, 3, "backward").minimal_bytes() == (3 + 6) * 10 * 8 * 4
    assert bench.Case("cpu", "float32", 10, 8, 3, "full").minimal_bytes() == (5 + 9) * 10 * 8 * 4


def test_eager_formula_is_the_math():
    x, z = torch.randn(6, 32, dtype=torch.float64), torch.randn(6, 3, 32, dtype=torch.float64)
    from purified_ops import reference

    torch.testing.assert_close(bench.eager_formula(x, z), reference.purify(x, z))
    torch.testing.assert_close(bench.eager_formula(x, z[:, :1]), reference.purify(x, z[:, :1]))


def test_every_step_computes_gradients():
    case = bench.Case("cpu", "float32", 4, 16, 2, "full")
    x, z, g = bench._make_inputs(case, 1, requires_grad=True)[0]
    for provider in ("purified_ops", "purified_ops_kernel", "eager", bench.COPY):
        bench._step(provider, "full", x, z, g)()


def test_measure_rows_and_csv_upsert(tmp_path):
    cases = bench.cases_for("cpu", ["float32"], [16], [32], [1], ["forward", "full"])
    results = bench.measure(cases, ["purified_ops", "purified_ops_kernel", "eager"], reps=3, warmup=1, progress=False)
    rows = bench.to_rows(results)
    assert len(rows) == 2 * 3
    for r in rows:
        assert r["median_ms"] > 0 and r["p20_ms"] <= r["median_ms"] <= r["p80_ms"] and r["copy_gbps"] > 0
        assert r["speedup_vs_compile"] != r["speedup_vs_compile"]  # NaN: compile was not measured
    path = tmp_path / "r.csv"
    bench.upsert_csv(str(path), rows)
    bench.upsert_csv(str(path), rows[:2])  # same keys: replaced, not appended
    with open(path, newline="") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    table = bench.format_table(rows)
    assert table.count("\n") == len(rows) and "purified_ops_kernel" in table
    out = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "benchmarks" / "plot.py"), str(path), "--out", str(tmp_path)],
                         capture_output=True, text=True, check=True).stdout.split()
    assert len(out) == 2 and all((tmp_path / p.split("/")[-1]).stat().st_size > 1000 for p in out)
