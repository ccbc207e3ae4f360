"""The public API: errors of docs/DESIGN.md, PurifyLayer, the fallback without the extension, the CLI."""
import copy
import subprocess
import sys
import warnings

import pytest
import torch

import purified_ops
from purified_ops import PurifyFunction, PurifyLayer, purify, reference
from purified_ops._cli_types import cpu_count
from torch.utils._python_dispatch import TorchDispatchMode

ENTRY_POINTS = {
    "purify": lambda x, z, **kw: purify(x, z, **kw),
    "function": lambda x, z, strength=1.0, eps=1e-6: PurifyFunction.apply(x, z, strength, eps)[0],
    "layer": lambda x, z, strength=1.0, eps=1e-6: PurifyLayer(strength, eps=eps)(x, z),
}

def nested(*rows, layout=torch.strided):
    """A nested tensor; the default layout reports torch.strided but has no sizes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "the nested tensor API is in prototype stage"
        return torch.nested.nested_tensor([torch.randn(n, 8) for n in rows], layout=layout)


BAD_INPUTS = [
    # (x, z, kwargs, error class, message fragment)
    (lambda: torch.randn(3, 8), lambda: torch.randn(3, 7), {}, ValueError, r"last dim must equal x's \(D = 8\)"),
    (lambda: torch.randn(3, 8), lambda: torch.randn(8), {}, ValueError, r"x \(3, 8\) and z \(8,\)"),
    (lambda: torch.randn(3, 8), lambda: torch.randn(1, 1, 1, 8), {}, ValueError, "one more"),
    (lambda: torch.randn(4, 8), lambda: torch.randn(3, 8), {}, ValueError, "leading dim 0 must equal x's or be 1"),
    (lambda: torch.randn(1, 8), lambda: torch.randn(3, 8), {}, ValueError, "never x over z's"),
    (lambda: torch.randn(3, 8), lambda: torch.randn(3, 0, 8), {}, ValueError, "at least one direction"),
    (lambda: torch.randn(3, 8), lambda: torch.randn(3, 8), {"eps": 0.0}, ValueError, "eps must be finite and > 0, got 0.0"),
    (lambda: torch.randn(3, 8), lambda: torch.randn(3, 8), {"eps": -1e-3}, ValueError, "got -0.001"),
    (lambda: torch.randn(3, 8), lambda: torch.randn(3, 8), {"eps": float("nan")}, ValueError, "eps must be finite"),
    (lambda: torch.randn(3, 8), lambda: torch.randn(3, 8), {"eps": float("inf")}, ValueError, "eps must be finite"),
    (lambda: torch.randn(3, 8), lambda: torch.randn(3, 8), {"eps": "1e-6"}, TypeError, "eps must be a real number"),
    (lambda: torch.randint(0, 5, (3, 8)), lambda: torch.randn(3, 8), {}, TypeError, "x must be float16, bfloat16, float32 or float64, got torch.int64"),
    (lambda: torch.randn(3, 8), lambda: torch.ones(3, 8, dtype=torch.bool), {}, TypeError, "z must be float16"),
    (lambda: torch.randn(3, 8, dtype=torch.complex64), lambda: torch.randn(3, 8), {}, TypeError, "complex64"),
    (lambda: [[1.0, 2.0]], lambda: torch.randn(1, 2), {}, TypeError, "x must be a torch.Tensor, got list"),
    (lambda: torch.randn(3, 8), lambda: None, {}, TypeError, "z must be a torch.Tensor, got NoneType"),
    (lambda: torch.tensor(1.0), lambda: torch.tensor(1.0), {}, ValueError, "0-dim"),
    (lambda: torch.randn(3, 8), lambda: torch.randn(3, 8, device="meta"), {}, ValueError, "one device, got cpu and meta"),
    (lambda: torch.randn(3, 8), lambda: torch.randn(3, 8), {"strength": torch.ones(2)}, ValueError, r"one-element 1-D tensor, got shape \(2,\)"),
    (lambda: torch.randn(3, 8), lambda: torch.randn(3, 8), {"strength": "1"}, TypeError, "strength must be a float"),
    (lambda: torch.randn(3, 8), lambda: torch.randn(3, 8), {"strength": torch.tensor(1)}, TypeError, "floating point"),
    (lambda: torch.randn(3, 8), lambda: torch.randn(3, 8), {"strength": 1e300}, ValueError,
     r"strength must be at most 3.40282e\+38 in magnitude \(finite in torch.float32.*got 1e\+300"),
    (lambda: torch.randn(3, 8, dtype=torch.bfloat16), lambda: torch.randn(3, 8, dtype=torch.bfloat16),
     {"strength": -1e39}, ValueError, "strength must be at most"),
    (lambda: torch.randn(3, 8), lambda: torch.randn(3, 8), {"strength": 10 ** 400}, ValueError,
     r"strength must be a finite float, got 1000.*\(401 characters\)"),
    (lambda: nested(3, 2), lambda: torch.randn(3, 8), {}, TypeError,
     r"x must be a dense \(strided\) tensor, got a nested tensor \(layout torch.strided\)"),
    (lambda: torch.randn(3, 8), lambda: nested(3, 2), {}, TypeError, "z must be a dense .* got a nested tensor"),
    (lambda: nested(3, 2, layout=torch.jagged), lambda: torch.randn(3, 8), {}, TypeError,
     r"x must be a dense .* nested tensor \(layout torch.jagged\)"),
    (lambda: torch.randn(3, 8), lambda: torch.randn(3, 8), {"strength": nested(1)}, TypeError,
     "strength must be a dense .* got a nested tensor"),
    (lambda: torch.randn(3, 8), lambda: torch.randn(3, 8), {"strength": torch.tensor(1.0).to_sparse()}, TypeError,
     "strength must be a dense .* got layout torch.sparse_coo"),
]


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
@pytest.mark.parametrize("case", range(len(BAD_INPUTS)))
def test_bad_input_raises_documented_error(entry, case):
    make_x, make_z, kwargs, error, message = BAD_INPUTS[case]
    if entry == "layer" and "strength" in kwargs and not isinstance(kwargs["strength"], (int, float)):
        pytest.skip("the layer checks strength when constructed (test_layer_rejects_bad_arguments)")
    with pytest.raises(error, match=message):
        ENTRY_POINTS[entry](make_x(), make_z(), **kwargs)


def test_strength_is_any_real_number_finite_in_the_arithmetic_dtype():
    from fractions import Fraction

    x, z = torch.randn(3, 8, dtype=torch.float64), torch.randn(3, 2, 8, dtype=torch.float64)
    for backend in ("auto", "reference"):
        torch.testing.assert_close(purify(x, z, strength=Fraction(1, 2), backend=backend), purify(x, z, strength=0.5))
        # float64 arithmetic holds 1e300: accepted there, finite where the projection is small.
        y = purify(x, z * 1e-160, strength=1e300, eps=1e-3, backend=backend)
        assert torch.isfinite(y).all()
    with pytest.raises(ValueError, match="strength must be at most 3.40282e"):
        PurifyLayer(1e300, learnable_strength=True)
    layer = PurifyLayer(1e300)  # a fixed strength is checked against the inputs' dtype, per call
    with pytest.raises(ValueError, match="strength must be at most"):
        layer(x.float(), z.float())
    assert torch.isfinite(layer(x, z * 1e-160)).all()


def test_unknown_backend():
    with pytest.raises(ValueError, match=r"backend must be one of .* got 'gpu'"):
        purify(torch.randn(2, 3), torch.randn(2, 3), backend="gpu")


def test_backend_for_other_device():
    with pytest.raises(ValueError, match="serves cpu tensors, but x is on meta"):
        purify(torch.randn(2, 3, device="meta"), torch.randn(2, 3, device="meta"), backend="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where CUDA is missing")
def test_unavailable_backend():
    with pytest.raises(RuntimeError, match="'cuda' is not available"):
        purify(torch.randn(2, 3), torch.randn(2, 3), backend="cuda")


def test_layer_rejects_bad_arguments():
    with pytest.raises(ValueError, match="eps"):
        PurifyLayer(eps=0)
    with pytest.raises(TypeError, match="strength"):
        PurifyLayer(strength="strong")
    with pytest.raises(TypeError, match="strength must be a dense .* got a nested tensor"):
        PurifyLayer(strength=torch.nested.nested_tensor([torch.ones(1)]), learnable_strength=True)
    with pytest.raises(TypeError, match="dim must be an int"):
        PurifyLayer(dim=1.0)
    with pytest.raises(ValueError, match="out of range"):
        PurifyLayer(dim=3)(torch.randn(2, 4), torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"\[B, C\] or \[B, K, C\]"):
        PurifyLayer(dim=1)(torch.randn(2, 4, 3, 3), torch.randn(2, 1, 1, 1, 4))


@pytest.mark.parametrize("case", range(len(BAD_INPUTS)))
def test_errors_come_before_any_kernel(case):
    # The profiler records every dispatcher call: the C++ checks raise before purify_forward.
    from torch.profiler import ProfilerActivity, profile

    make_x, make_z, kwargs, error, _ = BAD_INPUTS[case]
    x, z = make_x(), make_z()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with pytest.raises(error):
            purify(x, z, **kwargs)
    names = {e.name for e in prof.events()}
    assert not any(n.startswith("purified_ops::purify_") for n in names), names


class _DispatchedOps(TorchDispatchMode):
    """The ops that reach the kernels' dispatch keys, in order (purify's C++ checks and canonical
    form decompose before them)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("entry", ["purify", "layer"])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_a_float_strength_reaches_the_kernel_as_a_number(device, entry, requires_grad):
    # The number is an argument of the float overload: no strength tensor is made (a fill kernel
    # per call on a GPU), in inference and in training alike.
    x = torch.randn(4, 16, device=device, requires_grad=requires_grad)
    z = torch.randn(4, 2, 16, device=device)
    call = (lambda: purify(x, z, strength=0.25)) if entry == "purify" else (lambda: layer(x, z))
    layer = PurifyLayer(0.25)
    with _DispatchedOps() as seen:
        y = call()
    # (Training adds the autograd node's detach of a saved tensor: an alias, nothing allocated.)
    made = [op for op in seen.ops if op != "aten.detach.default"]
    assert made == ["purified_ops.purify_forward.float_strength"], seen.ops
    expect = purify(x, z, strength=torch.tensor(0.25, device=device))
    assert torch.equal(y, expect)
    if requires_grad:
        (gx,) = torch.autograd.grad(y.square().sum(), x)
        (want,) = torch.autograd.grad(expect.square().sum(), x)
        assert torch.equal(gx, want)


def test_vmap_of_purify_runs_the_batching_rule():
    # Without a derivative, vmap meets purify before its autograd keys: the op's decomposition
    # serves there too, so one batched kernel call runs, not a loop over the batch with a warning.
    from torch.profiler import ProfilerActivity, profile

    x, z = torch.randn(5, 3, 16), torch.randn(5, 1, 2, 16)  # per sample: 3 rows, 2 shared directions
    for strength in (0.5, torch.tensor(0.5)):
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                y = torch.func.vmap(lambda a, b: purify(a, b, strength=strength))(x, z)
        # The call on the batched tensors (of a sample's shape), and the rule's on the whole batch.
        shapes = [e.input_shapes[0] for e in prof.events() if e.name == "purified_ops::purify_forward"]
        assert [5, 3, 16] in shapes and len(shapes) < x.shape[0], shapes
        torch.testing.assert_close(y, purify(x, z, strength=strength), rtol=0, atol=1e-6)


def test_layer_nchw_matches_channels_last(device):
    layer = PurifyLayer(dim=1)
    x = torch.randn(2, 6, 5, 4, device=device)
    for z in (torch.randn(2, 6, device=device), torch.randn(2, 3, 6, device=device)):
        y = layer(x, z)
        assert y.shape == x.shape
        z_rows = z.view(2, 1, 1, *z.shape[1:])
        expect = purify(x.permute(0, 2, 3, 1), z_rows).permute(0, 3, 1, 2)
        torch.testing.assert_close(y, expect)
        # The purified channels are orthogonal to each sample's directions at every pixel.
        proj = torch.einsum("bchw,bkc->bkhw", y, z.view(2, -1, 6))
        assert proj.abs().max() < 1e-3


def test_layer_learnable_strength_gets_gradient(device):
    layer = PurifyLayer(0.5, learnable_strength=True).to(device)
    assert isinstance(layer.strength, torch.nn.Parameter)
    x, z = torch.randn(5, 8, device=device), torch.randn(5, 8, device=device)
    layer(x, z).square().sum().backward()
    assert layer.strength.grad is not None and layer.strength.grad.abs() > 0
    s = torch.tensor(0.5, requires_grad=True, device=device)
    reference.purify(x, z, strength=s).square().sum().backward()
    torch.testing.assert_close(layer.strength.grad, s.grad.reshape(1))


def test_layer_detach_irrelevant_stops_gradient_to_z(device):
    x = torch.randn(5, 8, device=device, requires_grad=True)
    z = torch.randn(5, 8, device=device, requires_grad=True)
    PurifyLayer(detach_irrelevant=True)(x, z).sum().backward()
    assert z.grad is None and x.grad is not None
    PurifyLayer()(x, z).sum().backward()
    assert z.grad is not None


def test_layer_repr_state_and_copy():
    layer = PurifyLayer(0.25, learnable_strength=True, eps=1e-5, detach_irrelevant=True, dim=1)
    assert repr(layer) == ("PurifyLayer(strength=0.25, learnable_strength=True, eps=1e-05, "
                           "detach_irrelevant=True, dim=1)")
    assert list(layer.state_dict()) == ["strength", "eps"]
    clone = copy.deepcopy(layer)
    assert clone.strength.item() == 0.25 and clone.strength is not layer.strength
    plain = PurifyLayer()
    assert list(plain.state_dict()) == ["eps", "strength"] and "strength=1.0" in repr(plain)


def test_layer_docstring_example():
    import doctest

    finder = doctest.DocTestFinder()
    tests = finder.find(PurifyLayer, globs={"torch": torch, "PurifyLayer": PurifyLayer})
    runner = doctest.DocTestRunner()
    for t in tests:
        runner.run(t)
    assert runner.summarize().failed == 0 and runner.summarize().attempted > 0


def test_fallback_without_extension(monkeypatch):
    from purified_ops import ops

    monkeypatch.setattr(ops, "_C", None)
    monkeypatch.setattr(ops, "_LOAD_ERROR", ImportError("no _C here"))
    monkeypatch.setattr(ops, "_warned_fallback", False)
    assert purified_ops.available_backends() == ("reference",)
    assert "no _C here" in purified_ops.build_info()["extension_error"]
    x, z = torch.randn(4, 8), torch.randn(4, 8)
    with pytest.warns(RuntimeWarning, match="falling back to the pure-PyTorch reference"):
        y = purify(x, z)
    torch.testing.assert_close(y, reference.purify(x, z))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        purify(x, z)  # warned once only
    with pytest.raises(RuntimeError, match="did not load"):
        PurifyFunction.apply(x, z, 1.0, 1e-6)


def test_cli_info():
    out = subprocess.run([sys.executable, "-m", "purified_ops", "info"], capture_output=True, text=True, check=True).stdout
    assert "backends: ['cpu'" in out and "cpu_capability:" in out and "openmp: True" in out


NO_CUDA = not torch.cuda.is_available()
# (command line, what its one-line error says): every value is checked while the command line is
# parsed, before any work starts: a value that cannot work ends the command at once, in one line,
# not after minutes of work or in a traceback.
BAD_COMMAND_LINES = [
    ("bench --N 0", "argument --N: must be >= 1, got 0"),
    ("bench --N -5", "argument --N: must be >= 1, got -5"),
    ("bench --D 0", "argument --D: must be >= 1, got 0"),
    ("bench --K 0", "argument --K: must be >= 1, got 0"),
    ("bench --K 1 two", "argument --K: must be a whole number >= 1, got 'two'"),
    ("bench --reps 0", "argument --reps: must be >= 1, got 0"),
    ("bench --threads -1", f"argument --threads: must be from 0 to {cpu_count()}, got -1"),
    ("bench --threads 100000", f"argument --threads: must be from 0 to {cpu_count()}, got 100000"),
    ("bench --budget-s 0", "argument --budget-s: must be a finite number > 0, got 0"),
    ("bench --max-gib nan", "argument --max-gib: must be a finite number > 0, got nan"),
    ("bench --device tpu", "argument --device: must be one of cpu, cuda, got 'tpu'"),
    pytest.param("bench --device cuda", "argument --device: 'cuda': no CUDA device here",
                 marks=pytest.mark.skipif(not NO_CUDA, reason="CUDA is available here")),
    ("verify --device tpu", "argument --device: must be one of cpu, cuda, all, got 'tpu'"),
    pytest.param("verify --device cuda --quick", "argument --device: 'cuda': no CUDA device here",
                 marks=pytest.mark.skipif(not NO_CUDA, reason="CUDA is available here")),
    ("demo --sizes 0", "argument --sizes: must be from 1 to 1000, got 0"),
    ("demo --sizes 50 -5", "argument --sizes: must be from 1 to 1000, got -5"),
    ("demo --default-size 1001", "argument --default-size: must be from 1 to 1000, got 1001"),
    ("demo --steps 0", "argument --steps: must be >= 1, got 0"),
    ("demo --seeds 0", "argument --seeds: must be >= 1, got 0"),
    ("demo --batch-size 0", "argument --batch-size: must be >= 1, got 0"),
    ("demo --lr -0.001", "argument --lr: must be a finite number > 0, got -0.001"),
    ("demo --irrelevant-weight inf", "argument --irrelevant-weight: must be a finite number >= 0, got inf"),
    ("demo --rho 1.5", "argument --rho: must be a finite number >= 0 and <= 1, got 1.5"),
    ("demo --k 0", "argument --k: must be from 1 to 64, got 0"),
    ("demo --bank-top 25", "argument --bank-top: must be from 1 to 24, got 25"),
    ("demo --threads 0", "argument --threads: must be >= 1, got 0"),
    ("demo --jobs 0", "argument --jobs: must be >= 1, got 0"),
    ("demo --device tpu", "argument --device: must be one of cpu, cuda, cuda:N, auto, got 'tpu'"),
    pytest.param("demo --device cuda", "argument --device: 'cuda': no CUDA device here",
                 marks=pytest.mark.skipif(not NO_CUDA, reason="CUDA is available here")),
    pytest.param("demo --device cuda:7", "argument --device: 'cuda:7': no CUDA device here",
                 marks=pytest.mark.skipif(not NO_CUDA, reason="CUDA is available here")),
]


@pytest.mark.parametrize("command, message", BAD_COMMAND_LINES)
def test_cli_rejects_bad_arguments_before_any_work(command, message, capsys):
    from purified_ops import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(command.split())
    assert exit_info.value.code == 2
    out, err = capsys.readouterr()
    prog = f"purified-ops {command.split()[0]}"
    assert out == "" and err.count("\n") == 1
    assert err.startswith(f"{prog}: error: {message}") and err.endswith(f"(see {prog} --help)\n")


@pytest.mark.parametrize("option", ["bench --csv", "demo --table", "demo --plot"])
def test_cli_writes_only_into_existing_folders(option, tmp_path, capsys):
    from purified_ops import cli

    target = tmp_path / "missing" / "out.csv"
    for path, message in ((target, f"the folder of '{target}' does not exist (it is not created)"),
                          (tmp_path, f"'{tmp_path}' is a folder, not a file")):
        with pytest.raises(SystemExit) as exit_info:
            cli.main([*option.split(), str(path)])
        assert exit_info.value.code == 2
        assert capsys.readouterr().err.startswith(f"purified-ops {option.split()[0]}: error: argument "
                                                  f"{option.split()[1]}: {message}")
    assert list(tmp_path.iterdir()) == []  # no folder made


def test_cli_bench_does_not_overwrite_a_file_that_is_not_its_csv(tmp_path, capsys):
    from purified_ops import cli

    other = tmp_path / "notes.csv"
    other.write_text("name,value\na,1\n")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "--dry-run", "--csv", str(other)])
    assert exit_info.value.code == 2
    assert "is not a CSV of this benchmark (its columns lack device_name" in capsys.readouterr().err
    assert other.read_text() == "name,value\na,1\n"


@pytest.mark.parametrize("command", ["bench --N 0", "demo --sizes 0", "demo --device tpu"])
def test_cli_argument_errors_are_one_line_without_traceback(command):
    out = subprocess.run([sys.executable, "-m", "purified_ops", *command.split()], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2 and out.stdout == ""
    assert len(out.stderr.splitlines()) == 1 and "Traceback" not in out.stderr, out.stderr
