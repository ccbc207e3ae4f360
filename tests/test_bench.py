"""The benchmark machinery (not speed): byte model, timed steps, CSV upsert, table, plots."""
import csv
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
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
    x, z, g = bench.make_inputs(case, 1, requires_grad=True)[0]
    for provider in ("purified_ops", "purified_ops_kernel", "eager", bench.COPY):
        bench._step(provider, "full", x, z, g)()


def test_sweep_rows_and_csv_upsert(tmp_path):
    cases = bench.cases_for("cpu", ["float32"], [16], [32], [1], ["forward", "full"])
    rows = bench.sweep(cases, ["purified_ops", "purified_ops_kernel", "eager"], reps=3, warmup=1, log=lambda _: None)
    assert len(rows) == 2 * 3
    for r in rows:
        assert r["median_ms"] > 0 and r["p20_ms"] <= r["median_ms"] <= r["p80_ms"] and r["copy_gbps"] > 0
        assert r["speedup_vs_compile"] != r["speedup_vs_compile"]  # NaN: compile was not measured
        assert r["cuda"] == "" and r["device_name"]
        assert r["load_before"] >= 0 and r["load_after"] >= 0  # the machine's load average, kept with each row
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


def test_fit_lowers_n_to_the_byte_cap():
    big = bench.Case("cuda", "float32", N=32768, D=16384, K=16, mode="forward")
    fitted = big.fit(8 << 30)
    assert fitted.N < big.N and fitted.N % 128 == 0 and fitted.mode == "forward"
    assert dataclasses.replace(fitted, mode="full").minimal_bytes() <= 8 << 30
    assert dataclasses.replace(fitted, N=fitted.N + 128, mode="full").minimal_bytes() > 8 << 30
    small = bench.Case("cuda", "bfloat16", N=32768, D=1024, K=1, mode="backward")
    assert small.fit(8 << 30) == small  # fits: unchanged
    assert bench.Case("cpu", "float32", 10**6, 10**6, 16, "full").fit(1).N == 128  # never below 128


def test_rotation_exceeds_the_cache_three_times_and_no_more():
    l2 = 50 << 20
    for D in (256, 1024, 4096, 16384):
        for K in (1, 4, 16):
            case = bench.Case("cuda", "bfloat16", 32768, D, K, "forward")
            n = bench.rotation_copies(case, l2)
            assert n * case.minimal_bytes() >= 3 * l2
            assert n == 1 or (n - 1) * case.minimal_bytes() < 3 * l2
    assert bench.rotation_copies(bench.Case("cpu", "float32", 16, 32, 1, "forward"), 0) == 1
    assert bench.l2_bytes("cpu") == 0


def test_sweep_writes_each_case_as_it_goes_and_respects_the_budget(tmp_path):
    (tmp_path / "out").mkdir()  # upsert_csv makes no folders
    paths = [str(tmp_path / "a.csv"), str(tmp_path / "out" / "b.csv")]
    cases = bench.cases_for("cpu", ["bfloat16"], [16], [24, 40], [2], ["backward"])
    seen = []

    def log(line):  # after the first case, its rows are already in both files
        if line.startswith("[") and not seen:
            seen.extend(len(list(csv.DictReader(open(p)))) for p in paths)

    rows = bench.sweep(cases, ["purified_ops"], reps=2, warmup=1, csv_paths=paths, log=log)
    assert seen == [1, 1] and len(rows) == 2
    for p in paths:
        assert {int(r["D"]) for r in csv.DictReader(open(p))} == {24, 40}
    lines = []
    assert bench.sweep(cases, ["purified_ops"], reps=2, budget_s=0.0, log=lines.append) == []
    assert sum("not measured" in line for line in lines) == len(cases)


def test_a_failing_provider_costs_its_rows_only():
    calls = []

    def broken(x, z):
        calls.append(1)
        raise RuntimeError("backend compiler failed\nwith a long trace")

    functions = {**bench.FUNCTIONS, "compile": broken}
    cases = bench.cases_for("cpu", ["float32"], [16], [32, 48], [1], ["forward"])
    lines = []
    rows = bench.sweep(cases, ["purified_ops", "compile"], reps=2, warmup=1, functions=functions, log=lines.append)
    assert {r["provider"] for r in rows} == {"purified_ops"} and len(rows) == 2
    assert all(r["speedup_vs_compile"] != r["speedup_vs_compile"] for r in rows)
    assert len(calls) == 1  # not tried again on the second case
    assert any("compile failed" in line and "backend compiler failed" in line for line in lines)


def test_cli_dry_run_of_the_cuda_preset_on_the_cpu(tmp_path, capsys):
    from purified_ops import cli

    path = tmp_path / "cuda.csv"
    assert cli.main(["bench", "--device", "cpu", "--preset", "cuda", "--dry-run", "--providers", "purified_ops",
                     "eager", "--csv", str(path)]) == 0
    rows = list(csv.DictReader(open(path)))
    # the preset's dtypes, K and modes at the dry run's sizes: 2 dtypes x 2 D x 3 K x 2 modes x 2 providers
    assert len(rows) == 48
    assert {r["dtype"] for r in rows} == {"bfloat16", "float32"} and {r["K"] for r in rows} == {"1", "4", "16"}
    assert {r["mode"] for r in rows} == {"forward", "backward"} and {r["D"] for r in rows} == {"256", "1000"}
    for r in rows:
        assert float(r["gbps"]) > 0 and float(r["pct_of_copy"]) > 0 and r["torch"] == torch.__version__
    assert "device:" in capsys.readouterr().out


def test_sweep_settings_precedence():
    s = bench.sweep_settings("cuda", {"dtypes": ["float32"], "reps": 5})
    assert s["dtypes"] == ["float32"] and s["reps"] == 5  # flags given beat the preset
    assert s["K"] == bench.PRESETS["cuda"]["K"] and s["compile_dynamic"] is True  # the preset beats the defaults
    assert bench.sweep_settings()["N"] == bench.DEFAULTS["N"]
    assert bench.sweep_settings("cuda", {"N": [4]}, dry_run=True)["N"] == bench.DRY_RUN["N"]  # dry run beats all
    with pytest.raises(ValueError, match="preset"):
        bench.sweep_settings("nope")
    with pytest.raises(ValueError, match="settings"):
        bench.sweep_settings(None, {"bogus": 1})


def test_benchmarking_compile_leaves_torch_settings_alone():
    import torch._dynamo.config as dynamo_config
    import torch._functorch.config as functorch_config

    def current():
        return (dynamo_config.recompile_limit, dynamo_config.accumulated_recompile_limit,
                functorch_config.donated_buffer)

    before = current()
    with bench.compile_settings():
        assert dynamo_config.recompile_limit >= 1024 and functorch_config.donated_buffer is False
    assert current() == before
    cases = bench.cases_for("cpu", ["float32"], [16], [32], [1], ["backward"])
    rows = bench.sweep(cases, ["compile"], reps=2, warmup=1, log=lambda _: None)
    assert {r["provider"] for r in rows} == {"compile"}  # compiled and replayed (no donated buffers)
    assert current() == before


def _step_rows(device, public_pct, kernel_ms, public_ms, vs_compile):
    """Rows of the cpu-step preset for one device, every case alike."""
    rows = []
    for (dtype, n, k) in [(d, n, k) for d in ("float32", "bfloat16") for n in (2048, 8192) for k in (1, 4)]:
        base = dict(device_name=device, mode="full", dtype=dtype, N=n, D=1024, K=k, torch="t", timestamp="2030",
                    load_before=0.5, load_after=0.6, p20_ms=1, p80_ms=1, gbps=1, copy_gbps=1, speedup_vs_eager=1)
        rows.append({**base, "provider": "purified_ops", "pct_of_copy": public_pct, "median_ms": public_ms,
                     "speedup_vs_compile": vs_compile})
        rows.append({**base, "provider": "purified_ops_kernel", "pct_of_copy": 100, "median_ms": kernel_ms,
                     "speedup_vs_compile": vs_compile * public_ms / kernel_ms})
        rows.append({**base, "provider": "compile", "pct_of_copy": 40, "median_ms": public_ms * vs_compile,
                     "speedup_vs_compile": 1.0})
    return rows


def test_step_table_checks_the_goals(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("summarize", Path(__file__).parents[1] / "benchmarks" / "summarize.py")
    summarize = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(summarize)
    # Every goal met: 90% of copy, 1.05x the kernels' time, 1.3x compile.
    lines, goals = summarize.step_table(_step_rows("cpu A", 90, 1.0, 1.05, 1.3), "cpu A")
    assert len(lines) == 3 + 8 and len(goals) == 10 and all(ok for _, ok in goals)
    # 80% of copy misses the K = 1 goal (85%) but meets K = 4's (75%); 1.2x the kernels' time and
    # 1.2x compile miss N 2048's goals; rows of another device are not read.
    rows = _step_rows("cpu B", 80, 1.0, 1.2, 1.2) + _step_rows("cpu A", 10, 1.0, 9.0, 0.1)
    _, goals = summarize.step_table(rows, "cpu B")
    missed = {g for g, ok in goals if not ok}
    assert missed == {"float32 N 8192 K 1: >= 85% of copy", "bfloat16 N 8192 K 1: >= 85% of copy",
                      "float32 N 2048 K 1: within 10% of the kernels alone",
                      "float32 N 2048 K 1: >= 1.25x torch.compile"}, missed
    path = tmp_path / "cpu_step.csv"
    bench.upsert_csv(str(path), rows)
    out = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "benchmarks" / "summarize.py"), "--step",
                          str(path), "--device", "cpu B"], capture_output=True, text=True, check=True).stdout
    assert "Goals met: 6 of 10." in out and "| bfloat16 | 8192 | 4 | 80% (1.20 ms) | 100% (1.00 ms)" in out
    plotted = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "benchmarks" / "plot.py"), "--step",
                              str(path), "--out", str(tmp_path)], capture_output=True, text=True, check=True).stdout
    assert plotted.split() == [str(tmp_path / "cpu_step.png")] and (tmp_path / "cpu_step.png").stat().st_size > 1000


def test_measuring_a_case_never_exhausts_dynamos_recompile_limit():
    """A forward case's saved-tensor measurement compiles the formula's gradient graph; outside
    compile_settings, past dynamo's recompile limit, dynamo then ran the formula eagerly for the
    rest of the sweep (a published "compile" column that timed the eager code)."""
    import torch._dynamo.config as dynamo_config
    from torch._dynamo.testing import CompileCounter

    def formula(x, z):  # a code object of its own: dynamo's verdict on it stays in this test
        return bench.eager_formula(x, z)

    counter = CompileCounter()
    compiled = torch.compile(formula, backend=counter, dynamic=False)
    with dynamo_config.patch(recompile_limit=1):
        bench.measure_case(bench.Case("cpu", "float32", 8, 16, 2, "forward"), providers=["compile"], reps=2,
                           warmup=1, functions={"compile": compiled}, log=lambda _: None)
        assert counter.frame_count == 2  # the forward graph and, for the saved tensors, the gradient graph
        with bench.compile_settings():
            compiled(torch.randn(8, 16), torch.randn(8, 1, 16))  # a new shape compiles: not given up
        assert counter.frame_count == 3
