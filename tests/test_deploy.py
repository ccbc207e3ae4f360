"""Where a trained model goes next: torch.func transforms under torch.compile, training an
exported program, core ATen and ONNX (onnxruntime), AOTInductor, a traced module trained in a
fresh process, FSDP; and what the layer's state dict holds. The op carries its own derivative
(docs/DESIGN.md, "Autograd"), so every tool that sees it in a graph can differentiate it."""
import os
import socket
import subprocess
import sys
import tempfile
import textwrap

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import purified_ops
from purified_ops import PurifyLayer, purify, reference
from purified_ops.testing import TOLERANCE, rel_err, reference_in_float64


# ---- torch.func transforms compiled -----------------------------------------------------------

def _loss(a, b):
    return (purify(a, b, strength=0.5) ** 2).sum()


TRANSFORMS = {
    "grad": lambda loss: torch.func.grad(loss, argnums=(0, 1)),
    "jacrev": lambda loss: torch.func.jacrev(lambda a, b: purify(a, b, strength=0.5), argnums=(0, 1)),
    "vmap_grad": lambda loss: torch.func.vmap(torch.func.grad(loss, argnums=(0, 1))),
}


@pytest.mark.parametrize("transform", list(TRANSFORMS))
def test_compiled_torch_func_transforms_equal_eager(device, transform):
    torch.manual_seed(0)
    x = torch.randn(3, 4, 8, dtype=torch.float64, device=device)
    z = torch.randn(3, 1, 2, 8, dtype=torch.float64, device=device)  # per sample: K = 2 shared by its 4 rows
    fn = TRANSFORMS[transform](_loss)
    eager = fn(x, z)
    compiled = torch.compile(fn, fullgraph=True)(x, z)
    ref = TRANSFORMS[transform](lambda a, b: (reference.purify(a, b, strength=0.5) ** 2).sum())(x, z)
    for a, b, r in zip(compiled, eager, ref):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(b, r)


# ---- export ----------------------------------------------------------------------------------

class _Net(torch.nn.Module):
    """Linear features, per-sample directions shared by the sample's tokens, a learnable strength
    (or a fixed one)."""

    def __init__(self, k=2, shared=True, d=24, learnable_strength=True):
        super().__init__()
        self.k, self.shared, self.d = k, shared, d
        self.enc = torch.nn.Linear(12, d)
        self.irr = torch.nn.Linear(12, k * d)
        self.purify = PurifyLayer(0.75, learnable_strength=learnable_strength)
        self.head = torch.nn.Linear(d, 3)

    def features(self, x):  # x [B, T, 12] -> (h [B, T, d], z)
        h = self.enc(x)
        if self.shared:
            z = self.irr(x.mean(1)).view(x.shape[0], 1, self.k, self.d)   # [B, 1, K, d]
        else:
            z = self.irr(x).view(*x.shape[:2], self.k, self.d)            # [B, T, K, d]
        return h, (z.squeeze(-2) if self.k == 1 else z)                     # K = 1 as [..., d]

    def forward(self, x):
        return self.head(self.purify(*self.features(x)))


def _grads(model, x):
    model.zero_grad()
    model(x).square().sum().backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def test_exported_program_trains_like_the_module(device):
    torch.manual_seed(0)
    model = _Net().to(device)
    x = torch.randn(4, 5, 12, device=device)
    exported = torch.export.export(model, (x,)).module()
    ours, expect = _grads(exported, x), _grads(model, x)
    assert set(ours) == set(expect)
    for name in expect:
        torch.testing.assert_close(ours[name], expect[name], msg=name)
    # And an optimizer step on each gives the same model.
    for m in (exported, model):
        torch.optim.SGD(m.parameters(), lr=0.1).step()
    torch.testing.assert_close(exported(x), model(x))


@pytest.mark.parametrize("k, shared", [(1, False), (2, False), (16, False), (16, True)])
def test_decompositions_lower_to_core_aten(k, shared):
    torch.manual_seed(0)
    model = _Net(k, shared).eval()
    x = torch.randn(3, 5, 12)
    ep = torch.export.export(model, (x,))
    assert "purified_ops.purify.strength_tensor" in {str(n.target) for n in ep.graph.nodes}  # the checked entry op
    core = ep.run_decompositions(purified_ops.export_decompositions())
    targets = {str(n.target) for n in core.graph.nodes if n.op == "call_function"}
    assert not any("purified_ops" in t for t in targets), targets
    assert not any("linalg" in t or "cholesky" in t or "triangular" in t for t in targets), targets
    with torch.no_grad():
        h, z = model.features(x)
        expect = reference_in_float64(h.double(), z.double(), 0.75)
        out = core.module()(x)
        torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)
    assert rel_err(model.purify(h, z), expect) <= TOLERANCE[torch.float32]


def test_compiled_graphs_call_the_fused_ops_not_the_decomposition(device):
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def capture(gm, _inputs):
        graphs.append({str(n.target) for n in gm.graph.nodes if n.op == "call_function"})
        return gm

    model = _Net(4).to(device)
    x = torch.randn(4, 5, 12, device=device)
    compiled = torch.compile(model, backend=aot_autograd(fw_compiler=capture, bw_compiler=capture), fullgraph=True)
    compiled(x).sum().backward()
    forward, backward = graphs
    assert "purified_ops.purify_forward.default" in forward
    assert "purified_ops.purify_backward.default" in backward
    assert not any("solve" in t or "cholesky" in t for t in forward | backward)


def test_compiled_graph_calls_the_float_overload_and_a_tensor_strength_never_recompiles(device):
    from torch._dynamo.backends.common import aot_autograd
    from torch._dynamo.utils import counters

    graphs = []

    def capture(gm, _inputs):
        graphs.append({str(n.target) for n in gm.graph.nodes if n.op == "call_function"})
        return gm

    x = torch.randn(8, 16, device=device, requires_grad=True)
    z = torch.randn(8, 2, 16, device=device)
    backend = aot_autograd(fw_compiler=capture, bw_compiler=capture)
    fixed = torch.compile(lambda a, b: purify(a, b, strength=0.5).square().sum(), backend=backend, fullgraph=True)
    fixed(x, z).backward()
    assert "purified_ops.purify_forward.float_strength" in graphs[0], graphs[0]
    assert "purified_ops.purify_backward.default" in graphs[1], graphs[1]
    # A strength that changes between calls, as a 0-dim tensor (docs/api.md): one graph for all.
    torch._dynamo.reset()
    counters.clear()
    scheduled = torch.compile(lambda a, b, s: purify(a, b, strength=s).square().sum(), fullgraph=True)
    for value in (0.5, 0.6, 0.7, 0.8):
        s = torch.tensor(value, device=device)
        torch.testing.assert_close(scheduled(x, z, s), purify(x, z, strength=s).square().sum())
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


# ---- ONNX and onnxruntime ----------------------------------------------------------------------

@pytest.mark.parametrize("k, shared", [(1, False), (2, False), (16, False), (16, True)])
def test_onnx_export_runs_in_onnxruntime_with_standard_operators(k, shared, tmp_path):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = _Net(k, shared).eval()
    x = torch.randn(3, 5, 12)
    program = torch.onnx.export(model, (x,), dynamo=True)
    proto = program.model_proto
    domains = {node.domain for node in proto.graph.node} | {f.domain for f in proto.functions}
    assert domains <= {"", "ai.onnx"}, domains  # standard operators only: no purified_ops domain
    path = tmp_path / "model.onnx"
    program.save(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        h, z = model.features(x)
        purified = reference_in_float64(h.double(), z.double(), 0.75)
        expect = model.head(purified.float())
        torch.testing.assert_close(torch.from_numpy(out), model(x), rtol=1e-4, atol=1e-5)
    # The float32 accuracy of docs/accuracy.md for the purified features, through the head's linear map.
    assert rel_err(torch.from_numpy(out), expect) <= 10 * TOLERANCE[torch.float32]


# ---- AOTInductor ------------------------------------------------------------------------------

@pytest.mark.parametrize("learnable_strength", [True, False], ids=["tensor strength", "float strength"])
def test_aot_inductor_package_runs_the_op(tmp_path, learnable_strength):
    torch.manual_seed(0)
    model = _Net(2, learnable_strength=learnable_strength).eval()
    x = torch.randn(4, 5, 12)
    ep = torch.export.export(model, (x,))
    path = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "model.pt2"))
    runner = torch._inductor.aoti_load_package(path)
    with torch.no_grad():
        torch.testing.assert_close(runner(x), model(x))


# ---- jit.trace: a trainable traced model, saved, loaded and trained in a fresh process ----------

class _TraceNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = torch.nn.Linear(8, 16)
        self.purify = PurifyLayer(0.5)

    def forward(self, x, z):
        return self.purify(self.enc(x), z)


def test_traced_trainable_model_saves_loads_and_trains_in_a_fresh_process(tmp_path):
    torch.manual_seed(0)
    model = _TraceNet()
    x, z = torch.randn(4, 3, 8), torch.randn(4, 1, 2, 16)
    traced = torch.jit.trace(model, (x, z))  # check_trace: the re-trace must give the same graph
    path = tmp_path / "traced.pt"
    traced.save(str(path))
    torch.save((x, z), tmp_path / "inputs.pt")
    script = textwrap.dedent(f"""
        import torch, purified_ops
        m = torch.jit.load({str(path)!r})
        x, z = torch.load({str(tmp_path / 'inputs.pt')!r})
        m(x, z).square().sum().backward()
        torch.save({{n: p.grad for n, p in m.named_parameters()}}, {str(tmp_path / 'grads.pt')!r})
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300)
    grads = torch.load(tmp_path / "grads.pt")
    model(x, z).square().sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, msg=name)


# ---- FSDP: a learnable strength is a parameter it shards -------------------------------------

STEPS, BATCH = 3, 8


def _fsdp_batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH, 5, 12, generator=g), torch.randint(0, 3, (BATCH,), generator=g)) for _ in range(STEPS)]


def _train(model, batches):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, t in batches:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x).mean(1), t).backward()
        opt.step()


def _fsdp_worker(rank, world, port, out, version):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = _Net()
        share = BATCH // world
        batches = [(x[rank * share:(rank + 1) * share], t[rank * share:(rank + 1) * share]) for x, t in _fsdp_batches()]
        if version == 2:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            fully_shard(model.purify, mesh=init_device_mesh("cpu", (world,)))
            fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
            _train(model, batches)
            state = {k: getattr(v, "full_tensor", v.clone)() for k, v in model.state_dict().items()}
        else:
            from torch.distributed.fsdp import FullStateDictConfig, FullyShardedDataParallel, StateDictType

            model = FullyShardedDataParallel(model, device_id=torch.device("cpu"), use_orig_params=True)
            _train(model, batches)
            with FullyShardedDataParallel.state_dict_type(model, StateDictType.FULL_STATE_DICT,
                                                          FullStateDictConfig(rank0_only=False)):
                state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if rank == 0:
            torch.save(state, out)
        dist.barrier()  # both ranks leave together (see the DDP test)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("version", [2, 1], ids=["fully_shard", "FSDP1"])
def test_fsdp_two_processes_match_single_process_training(version):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rank0.pt")
        mp.spawn(_fsdp_worker, args=(2, port, out, version), nprocs=2, join=True)
        sharded = torch.load(out)
    torch.manual_seed(0)
    single = _Net()
    _train(single, _fsdp_batches())  # the whole batch: FSDP averages the two halves' gradients
    expect = single.state_dict()
    assert set(sharded) == set(expect) and sharded["purify.strength"].shape == (1,)
    for name, value in expect.items():
        torch.testing.assert_close(sharded[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert sharded["purify.strength"].item() != 0.75  # the strength was trained


# ---- the layer's state ------------------------------------------------------------------------

def test_fixed_strength_and_eps_are_in_the_state_dict(tmp_path):
    saved = PurifyLayer(0.3, eps=1e-3)
    state = saved.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())  # e.g. for safetensors
    loaded = PurifyLayer()
    loaded.load_state_dict(state)
    assert (loaded.strength, loaded.eps) == (0.3, 1e-3)
    x, z = torch.randn(4, 8), torch.randn(4, 2, 8) * 1e-2
    assert torch.equal(loaded(x, z), saved(x, z))
    # A learnable strength and eps round-trip too, through a file, and keep their values through
    # model.to(dtype) (they are not buffers).
    learned = PurifyLayer(0.3, learnable_strength=True, eps=3e-5).to(torch.bfloat16)
    torch.save(learned.state_dict(), tmp_path / "layer.pt")
    other = PurifyLayer(learnable_strength=True).to(torch.bfloat16)
    other.load_state_dict(torch.load(tmp_path / "layer.pt"))
    assert other.eps == 3e-5 and torch.equal(other.strength, learned.strength)


def test_state_dicts_of_earlier_layers_still_load():
    # A learnable strength was a 0-dim parameter, and no state dict held eps or a fixed strength.
    layer = PurifyLayer(learnable_strength=True, eps=1e-4)
    layer.load_state_dict({"strength": torch.tensor(0.25)})
    assert layer.strength.shape == (1,) and layer.strength.item() == 0.25 and layer.eps == 1e-4
    fixed = PurifyLayer(0.5, eps=1e-5)
    fixed.load_state_dict({})
    assert (fixed.strength, fixed.eps) == (0.5, 1e-5)


def test_strength_of_shape_one_is_accepted_everywhere(device):
    x, z = torch.randn(4, 8, device=device), torch.randn(4, 2, 8, device=device)
    s = torch.tensor([0.4], device=device, requires_grad=True)
    for backend in ("auto", "reference"):
        s.grad = None
        y = purify(x, z, strength=s, backend=backend)
        torch.testing.assert_close(y, purify(x, z, strength=0.4))
        y.sum().backward()
        assert s.grad.shape == (1,)
