"""The PurifiedLearning recipe (purified_ops.recipe.learning) and a tiny run of the demo pipeline."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from purified_ops.recipe.learning import (InputPurifiedNet, LowRankProbe, PerDirectionHeads, PurifiedNet, UnpurifiedNet,
                                   evaluate, fit, freeze_irrelevant, purified_loss)

B, IN, D = 12, 10, 6


def mlp(out=D):
    return nn.Sequential(nn.Linear(IN, 16), nn.ReLU(), nn.Linear(16, out))


def make_net(**kw):
    torch.manual_seed(0)
    return PurifiedNet(mlp(), mlp(), nn.Linear(D, 3), nn.Linear(D, 4), **kw)


def make_data(n=B, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, IN, generator=g), torch.randint(0, 3, (n,), generator=g), torch.randint(0, 4, (n,), generator=g)


def test_shapes_and_purification():
    net = make_net()
    x, _, _ = make_data()
    out = net(x)
    assert out.task_logits.shape == (B, 3)
    assert out.irrelevant_logits.shape == (B, 4)
    assert out.features.shape == out.irrelevant_features.shape == out.purified.shape == (B, D)
    # strength 1: the purified features are orthogonal to each sample's irrelevant direction
    dots = (out.purified * out.irrelevant_features).sum(-1)
    assert dots.abs().max() < 1e-4 * out.features.norm(dim=-1).max() * out.irrelevant_features.norm(dim=-1).max()


def make_unpurified_net():
    torch.manual_seed(0)
    return UnpurifiedNet(mlp(), nn.Linear(D, 3), nn.Linear(D, 4))


def test_unpurified_net_heads_read_the_network_features():
    net = make_unpurified_net()
    x, _, _ = make_data()
    out = net(x)
    h = net.network(x)
    for t in (out.features, out.irrelevant_features, out.purified):
        assert torch.equal(t, h)                                 # nothing purified
    assert torch.equal(out.task_logits, net.task_head(h))
    assert torch.equal(out.irrelevant_logits, net.irrelevant_head(h))


def test_unpurified_net_two_stage_trains_the_network_with_the_irrelevant_head_first():
    net = make_unpurified_net()
    before = {name: [p.detach().clone() for p in getattr(net, name).parameters()]
              for name in ("network", "task_head", "irrelevant_head")}
    fit(net, make_data(n=32), epochs=0, stage1_epochs=2, batch_size=8, schedule="two_stage", seed=0,
        progress=False, lr=1e-2)

    def moved(name):
        return any(not torch.equal(a, p.detach()) for a, p in zip(before[name], getattr(net, name).parameters()))

    assert moved("network") and moved("irrelevant_head") and not moved("task_head")
    assert not any(p.requires_grad for p in net.irrelevant_head.parameters())   # frozen for stage 2
    assert all(p.requires_grad for p in net.network.parameters())


def test_k_directions_and_per_direction_heads():
    torch.manual_seed(0)
    K = 3

    class KEncoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(IN, K * D)

        def forward(self, h):
            return self.lin(h).view(-1, K, D)

    net = PurifiedNet(mlp(), KEncoder(), nn.Linear(D, 3), PerDirectionHeads(D, [4, 2, 5]))
    x, y, _ = make_data()
    out = net(x)
    assert out.irrelevant_features.shape == (B, K, D)
    assert [t.shape for t in out.irrelevant_logits] == [(B, 4), (B, 2), (B, 5)]
    # orthogonal to all K directions
    assert torch.einsum("bd,bkd->bk", out.purified, out.irrelevant_features).abs().max() < 1e-3
    labels = torch.stack([torch.randint(0, c, (B,)) for c in (4, 2, 5)], -1)  # [B, T]
    loss, parts = purified_loss(out, y, labels, irrelevant_weight=0.5)
    expected_irr = sum(F.cross_entropy(l, labels[:, k]) for k, l in enumerate(out.irrelevant_logits)) / 3
    assert torch.allclose(loss, F.cross_entropy(out.task_logits, y) + 0.5 * expected_irr, atol=1e-6)
    assert parts["irrelevant"] == pytest.approx(float(expected_irr.detach()), rel=1e-6)
    with pytest.raises(ValueError):
        purified_loss(out, y, labels[:, :2])


def test_loss_values():
    net = make_net()
    x, y, t = make_data()
    out = net(x)
    loss, parts = purified_loss(out, y, t, irrelevant_weight=0.3)
    task = F.cross_entropy(out.task_logits, y)
    irr = F.cross_entropy(out.irrelevant_logits, t)
    assert torch.allclose(loss, task + 0.3 * irr)
    assert parts == pytest.approx({"task": task.item(), "irrelevant": irr.item()})
    only_task, _ = purified_loss(out, y, None)
    assert torch.allclose(only_task, task)


def test_bad_irrelevant_shape():
    torch.manual_seed(0)
    net = PurifiedNet(mlp(), mlp(out=D + 1), nn.Linear(D, 3), nn.Linear(D + 1, 4))
    with pytest.raises(ValueError, match="irrelevant features"):
        net(make_data()[0])


def _grads(module):
    return [p.grad for p in module.parameters()]


@pytest.mark.parametrize("detach", [False, True])
def test_gradient_flow_detach_irrelevant(detach):
    net = make_net(detach_irrelevant=detach)
    x, y, t = make_data()
    out = net(x)
    F.cross_entropy(out.task_logits, y).backward()      # the task loss alone
    assert all(g is not None and g.abs().sum() > 0 for g in _grads(net.main_encoder))
    irr_grads = _grads(net.irrelevant_encoder)
    if detach:
        assert all(g is None for g in irr_grads)          # the task loss stops at z
    else:
        assert all(g is not None and g.abs().sum() > 0 for g in irr_grads)
    assert all(g is None for g in _grads(net.irrelevant_head))
    # the irrelevant loss reaches the irrelevant encoder whatever detach says
    net.zero_grad(set_to_none=True)
    out = net(x)
    F.cross_entropy(out.irrelevant_logits, t).backward()
    assert all(g is not None and g.abs().sum() > 0 for g in _grads(net.irrelevant_encoder))
    assert all(g is None for g in _grads(net.main_encoder))


def test_learnable_strength_gets_gradient():
    net = make_net(learnable_strength=True, strength=0.5)
    x, y, t = make_data()
    loss, _ = purified_loss(net(x), y, t)
    loss.backward()
    assert net.purifier.strength.grad is not None and torch.isfinite(net.purifier.strength.grad)


def test_two_stage_freezes_irrelevant_branch():
    net = make_net()
    data = make_data(n=32)
    # capture after stage 1 by wrapping freeze: snapshot the branch when stage 2 begins
    snapshots = {}
    import purified_ops.recipe.learning as learning
    real_freeze = learning.freeze_irrelevant

    def spy(model, frozen=True):
        snapshots["main"] = [p.detach().clone() for p in model.main_encoder.parameters()]
        snapshots["irr"] = [p.detach().clone() for p in model.irrelevant_parameters()]
        real_freeze(model, frozen)

    before_main = [p.detach().clone() for p in net.main_encoder.parameters()]
    learning.freeze_irrelevant = spy
    try:
        hist = fit(net, data, epochs=3, stage1_epochs=2, batch_size=8, schedule="two_stage", seed=0,
                   progress=False, lr=1e-2)
    finally:
        learning.freeze_irrelevant = real_freeze
    assert len(hist["stage1"]) == 2 and len(hist["stage2"]) == 3
    assert all(h["task"] > 0 for h in hist["stage2"])
    # stage 1 trains only the irrelevant branch: the main encoder is untouched
    assert all(torch.equal(a, b) for a, b in zip(before_main, snapshots["main"]))
    # stage 2: the irrelevant branch is unchanged and has no grads; the main encoder moved
    for p, snap in zip(net.irrelevant_parameters(), snapshots["irr"]):
        assert torch.equal(p.detach(), snap)
        assert p.grad is None and not p.requires_grad
    assert any(not torch.equal(a, p.detach()) for a, p in zip(snapshots["main"], net.main_encoder.parameters()))
    freeze_irrelevant(net, False)
    assert all(p.requires_grad for p in net.irrelevant_parameters())


def test_joint_fit_learns_and_is_seeded():
    data = make_data(n=64)
    accs = []
    for _ in range(2):
        net = make_net()
        hist = fit(net, data, epochs=30, batch_size=16, seed=3, progress=False, lr=1e-2)
        accs.append(evaluate(net, data))
        assert hist["joint"][-1]["loss"] < hist["joint"][0]["loss"]
    assert accs[0] == accs[1]                      # same seed, same result
    assert accs[0]["task_acc"] > 0.6               # fits the training set
    assert len(accs[0]["irrelevant_acc"]) == 1
    with pytest.raises(ValueError):
        fit(make_net(), data, schedule="three_stage", progress=False)


def make_subspace_net(K=3, backbone=False, detach_input=False, **kw):
    """Subspace purification: K shared directions from a LowRankProbe, an MLP head on the coordinates."""
    torch.manual_seed(0)
    head = nn.Sequential(nn.Linear(K, 8), nn.ReLU(), nn.Linear(8, 4))
    if backbone:
        return PurifiedNet(nn.Identity(), LowRankProbe(D, K, detach_input=detach_input), nn.Linear(D, 3), head,
                           backbone=mlp(), **kw)
    return InputPurifiedNet(mlp(), LowRankProbe(IN, K), nn.Linear(D, 3), head, **kw)


def _task_parameters(net):
    """The task branch after the purify layer: the network and the task head."""
    return [*net.network.parameters(), *net.task_head.parameters()]


def test_low_rank_probe_shapes_and_shared_subspace():
    K = 3
    net = make_subspace_net(K)
    x, y, t = make_data()
    out = net(x)
    P = net.irrelevant_encoder.directions
    assert P.shape == (K, IN)
    assert out.irrelevant_features.shape == (1, K, IN)          # one set, broadcast, not materialized
    assert out.purified.shape == out.features.shape == (B, IN) and out.task_logits.shape == (B, 3)
    assert out.irrelevant_logits.shape == (B, 4)
    # the purified inputs are orthogonal to the whole subspace, and equal x minus its projection
    assert (out.purified @ P.t()).abs().max() < 1e-4
    Q, _ = torch.linalg.qr(P.detach().t())
    assert torch.allclose(out.purified, x - (x @ Q) @ Q.t(), atol=1e-4)
    # the irrelevant head reads the sample's coordinates along P
    assert torch.allclose(out.irrelevant_logits, net.irrelevant_head(x @ P.t()))
    loss, parts = purified_loss(out, y, t)
    assert torch.allclose(loss, F.cross_entropy(out.task_logits, y) + F.cross_entropy(out.irrelevant_logits, t))


@pytest.mark.parametrize("detach", [False, True])
def test_low_rank_probe_gradient_flow(detach):
    net = make_subspace_net(detach_irrelevant=detach)
    x, y, t = make_data()
    F.cross_entropy(net(x).task_logits, y).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in _task_parameters(net))
    P = net.irrelevant_encoder.directions
    if detach:
        assert P.grad is None                                   # the task loss never moves the subspace
    else:
        assert P.grad is not None and P.grad.abs().sum() > 0
    assert all(g is None for g in _grads(net.irrelevant_head))
    net.zero_grad(set_to_none=True)
    F.cross_entropy(net(x).irrelevant_logits, t).backward()
    assert P.grad is not None and P.grad.abs().sum() > 0       # the irrelevant loss shapes it
    assert all(p.grad is None for p in _task_parameters(net))


@pytest.mark.parametrize("detach_input", [False, True])
def test_low_rank_probe_on_shared_backbone(detach_input):
    net = make_subspace_net(backbone=True, detach_input=detach_input, detach_irrelevant=True)
    x, _, t = make_data()
    out = net(x)
    assert out.irrelevant_features.shape == (1, 3, D) and out.purified.shape == (B, D)
    F.cross_entropy(out.irrelevant_logits, t).backward()
    assert net.irrelevant_encoder.directions.grad is not None
    backbone_grads = _grads(net.backbone)
    if detach_input:
        assert all(g is None for g in backbone_grads)           # the probe observes, does not shape
    else:
        assert all(g is not None and g.abs().sum() > 0 for g in backbone_grads)


def test_two_stage_freezes_low_rank_probe():
    net = make_subspace_net(detach_irrelevant=True)
    data = make_data(n=32)
    P0 = net.irrelevant_encoder.directions.detach().clone()
    task0 = [p.detach().clone() for p in _task_parameters(net)]
    import purified_ops.recipe.learning as learning
    real_freeze, snap = learning.freeze_irrelevant, {}

    def spy(model, frozen=True):
        snap["P"] = model.irrelevant_encoder.directions.detach().clone()
        snap["task"] = [p.detach().clone() for p in _task_parameters(model)]
        real_freeze(model, frozen)

    learning.freeze_irrelevant = spy
    try:
        fit(net, data, epochs=3, stage1_epochs=2, batch_size=8, schedule="two_stage", seed=0, progress=False,
            lr=1e-2)
    finally:
        learning.freeze_irrelevant = real_freeze
    assert not torch.equal(snap["P"], P0)                                    # stage 1 learned P
    assert all(torch.equal(a, b) for a, b in zip(task0, snap["task"]))      # and nothing else
    assert torch.equal(net.irrelevant_encoder.directions.detach(), snap["P"])  # stage 2 kept P
    assert not net.irrelevant_encoder.directions.requires_grad
    assert any(not torch.equal(a, p.detach()) for a, p in zip(snap["task"], _task_parameters(net)))


def test_demo_arms_share_the_main_network():
    pytest.importorskip("sklearn")
    from purified_ops.recipe.demo import SUBSPACE_K, build_arm

    plain = build_arm("plain", 3)
    sub = build_arm("purified", 3)
    per = build_arm("purified", 3, variant="per_sample")
    assert isinstance(plain, UnpurifiedNet) and isinstance(sub, InputPurifiedNet) and isinstance(per, PurifiedNet)
    for a, b in zip(list(plain.network.parameters()) + list(plain.task_head.parameters()),
                    list(sub.network.parameters()) + list(sub.task_head.parameters())):
        assert torch.equal(a, b)                                 # same initial weights
    for a, b in zip(list(plain.network.parameters()) + list(plain.task_head.parameters()),
                    list(per.main_encoder.parameters()) + list(per.task_head.parameters())):
        assert torch.equal(a, b)
    x = torch.rand(5, 64)
    out = sub(x)
    assert out.irrelevant_features.shape == (1, SUBSPACE_K, 64) and out.task_logits.shape == (5, 10)
    with pytest.raises(ValueError):
        build_arm("purified", 0, variant="nope")


def test_demo_validation_split_is_disjoint():
    pytest.importorskip("sklearn")
    from purified_ops.recipe.demo.data import VALIDATION_SIZE, _split, load_validation

    xv, yv, tv = load_validation(100, 7)
    assert xv.shape == (VALIDATION_SIZE, 64)
    assert 0.15 < (tv == yv % 4).float().mean() < 0.35          # textures uniform, as at test
    # validation images come from the pool minus the training set: never training or test images
    _, _, test_idx, rest, train_idx, _ = _split(100, 7)
    assert len(set(rest) & set(train_idx)) == 0 and len(set(rest) & set(test_idx)) == 0
    assert len(rest) + len(train_idx) + len(test_idx) == 1797
    xv2, _, _ = load_validation(100, 7)
    assert torch.equal(xv, xv2)


def test_demo_data_is_honest():
    pytest.importorskip("sklearn")
    from purified_ops.recipe.demo import TEST_SIZE, load_data

    (x, y, tex), (xt, yt, text) = load_data(200, 0, "correlated", rho=1.0)
    assert x.shape == (200, 64) and xt.shape == (TEST_SIZE, 64)
    assert torch.equal(tex, y % 4)                             # rho=1: the shortcut holds in training
    agree = (text == yt % 4).float().mean()
    assert 0.15 < agree < 0.35                                 # at test it does not (chance 0.25)
    (_, y2, tex2), (xt2, _, text2) = load_data(200, 0, "independent")
    assert 0.1 < (tex2 == y2 % 4).float().mean() < 0.4
    assert torch.equal(xt, xt2) and torch.equal(text, text2)   # one fixed test set


def test_demo_cli_tiny(tmp_path, capsys):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    from purified_ops.cli import main

    png = tmp_path / "curve.png"
    rc = main(["demo", "--sizes", "20", "30", "--default-size", "20", "--seeds", "2", "--steps", "5",
               "--plot", str(png), "--json", "--no-progress"])
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    obj = json.loads(lines[-1])
    assert len(obj["baseline_acc"]) == len(obj["purified_acc"]) == len(obj["multitask_acc"]) == 2
    assert all(0.0 <= a <= 1.0 for a in obj["baseline_acc"] + obj["purified_acc"])
    assert obj["regime"] == "correlated" and obj["default_size"] == 20
    assert obj["variant"] == "subspace" and obj["k"] == 16
    assert obj["schedule"] == "two_stage" and obj["balanced"] is True
    assert set(obj["by_regime"]) == {"correlated", "independent"}
    assert png.stat().st_size > 1000
    assert any("purified-plain" in line for line in lines)
    rc = main(["demo", "--sizes", "20", "--default-size", "20", "--seeds", "1", "--steps", "3",
               "--regime", "independent",
               "--variant", "per_sample", "--plot", "", "--json", "--no-progress"])
    assert rc == 0
    obj = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert obj["variant"] == "per_sample" and len(obj["purified_acc"]) == 1


def test_balancing_tables_make_labels_independent():
    from purified_ops.recipe.learning import balancing_tables, balancing_weights

    y = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 0])
    t = torch.tensor([0, 0, 1, 1, 1, 0, 0, 0, 1, 0])            # correlated with y
    w = balancing_weights(y, t)
    assert w.shape == (10,) and torch.all(w > 0)
    joint = torch.zeros(3, 2, dtype=torch.float64)
    joint.index_put_((y, t), w.double(), accumulate=True)
    # weighted joint counts = n_y * n_t / N (the product of the marginals) in every occupied cell
    expected = torch.bincount(y).double()[:, None] * torch.bincount(t).double()[None] / len(y)
    occupied = torch.zeros(3, 2, dtype=torch.bool)
    occupied[y, t] = True
    assert torch.allclose(joint[occupied], expected[occupied]) and not occupied[1, 0]
    # several label types: [N, T]; a cell that never occurs gets weight 0 when looked up
    w2 = balancing_weights(y, torch.stack([t, 1 - t], -1))
    assert w2.shape == (10, 2) and torch.allclose(w2[:, 0], w)
    tables = balancing_tables(y, t)
    assert float(tables[0][1, 0]) == 0.0                       # (y=1, t=0) never occurs
    assert float(balancing_weights(torch.tensor([5]), torch.tensor([0]), tables)) == 0.0
    with pytest.raises(ValueError):
        balancing_tables(y, t[:5])


def test_weighted_irrelevant_loss():
    net = make_net()
    x, y, t = make_data()
    out = net(x)
    w = torch.rand(B) + 0.1
    loss, parts = purified_loss(out, y, t, irrelevant_sample_weight=w)
    ce = F.cross_entropy(out.irrelevant_logits, t, reduction="none")
    assert torch.allclose(loss, F.cross_entropy(out.task_logits, y) + (w * ce).sum() / w.sum(), atol=1e-6)
    ones, _ = purified_loss(out, y, t, irrelevant_sample_weight=torch.ones(B))
    assert torch.allclose(ones, purified_loss(out, y, t)[0], atol=1e-6)


def test_fit_balance_irrelevant_changes_training_deterministically():
    x, y, t = make_data(n=40, seed=3)
    t = torch.where(torch.arange(40) < 30, y % 4, t)          # a shortcut: t mostly follows y
    runs = []
    for balance in (False, True, True):
        net = make_net(detach_irrelevant=True)
        hist = fit(net, (x, y, t), epochs=3, batch_size=8, seed=0, progress=False,
                   balance_irrelevant=balance)
        runs.append((hist["joint"][-1]["irrelevant"], [p.detach().clone() for p in net.irrelevant_parameters()]))
    assert runs[1][0] == runs[2][0]                            # seeded: the same run twice
    assert all(torch.equal(a, b) for a, b in zip(runs[1][1], runs[2][1]))
    assert any(not torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))
    with pytest.raises(ValueError, match="irrelevant labels"):
        fit(make_net(), (x, y), epochs=1, progress=False, balance_irrelevant=True)


def test_fit_looks_balancing_weights_up_once_for_tensor_data(monkeypatch):
    from purified_ops.recipe import learning

    x, y, t = make_data(n=40, seed=3)
    t = torch.where(torch.arange(40) < 30, y % 4, t)
    calls = []
    real = learning.balancing_weights
    monkeypatch.setattr(learning, "balancing_weights", lambda *a, **k: calls.append(1) or real(*a, **k))
    net = make_net(detach_irrelevant=True)
    fit(net, (x, y, t), epochs=1, batch_size=8, seed=0, progress=False, balance_irrelevant=True)
    assert len(calls) == 1                                     # every sample's weight at once, not per batch
    # the same batches as an iterable: weights looked up per batch; the training is bit for bit the same
    order = torch.randperm(40, generator=torch.Generator().manual_seed(0))
    batches = [(x[i], y[i], t[i]) for i in order.split(8)]
    net_iter = make_net(detach_irrelevant=True)
    fit(net_iter, batches, epochs=1, batch_size=8, seed=0, progress=False, balance_irrelevant=True)
    assert len(calls) == 1 + len(batches)
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), net_iter.parameters()))
    calls.clear()                                              # two stages: stage 2 has no irrelevant loss
    fit(make_net(), (x, y, t), epochs=1, batch_size=8, seed=0, progress=False, balance_irrelevant=True,
        schedule="two_stage")
    assert len(calls) == 1


def test_demo_parallel_runs_equal_sequential_ones():
    pytest.importorskip("sklearn")
    from purified_ops.recipe.demo import GRATING_ARMS, run_jobs

    jobs = [(r, 20, s, a) for r in ("correlated", "independent") for s in range(2) for a in GRATING_ARMS]
    options = dict(steps=5, batch_size=8, lr=1e-3, irrelevant_weight=1.0, rho=0.9, nuisance="grating",
                   schedule="two_stage", balance_irrelevant=True)
    done = []
    parallel = run_jobs(jobs, options, workers=2, on_done=done.append)
    assert parallel == run_jobs(jobs, options, workers=1)        # bit for bit, in job order
    assert sorted(done) == sorted(jobs)                          # each run reported as it finished


def test_class_subspace_bank_shapes_and_selection():
    from purified_ops.recipe.learning import ClassSubspaceBank

    torch.manual_seed(0)
    bank = ClassSubspaceBank(D, 5, 2)
    h = torch.randn(B, D)
    z, logits = bank(h)                                   # training mode: probability-weighted
    assert z.shape == (B, 2, D) and logits.shape == (B, 5)
    assert torch.allclose(z, torch.einsum("bc,ckd->bkd", logits.softmax(-1), bank.bank))
    bank.eval()                                           # eval: the top-1 class's own directions
    z, logits = bank(h)
    assert torch.equal(z, bank.bank[logits.argmax(-1)])
    assert torch.allclose(logits, torch.einsum("bd,ckd->bck", h, bank.bank).square().sum(-1) + bank.bias)
    two = ClassSubspaceBank(D, 5, 2, top=2).eval()
    z2, l2 = two(h)
    top2 = l2.topk(2, -1).indices
    assert z2.shape == (B, 4, D) and torch.equal(z2[:, 2:], two.bank[top2[:, 1]])
    soft = ClassSubspaceBank(D, 5, 2, hard=False).eval()
    zs, ls = soft(h)
    assert torch.allclose(zs, torch.einsum("bc,ckd->bkd", ls.softmax(-1), soft.bank))
    with pytest.raises(ValueError):
        bank(torch.randn(B, D + 1))


def test_class_subspace_bank_moments_find_each_class_subspace():
    from purified_ops.recipe.learning import ClassSubspaceBank

    g = torch.Generator().manual_seed(1)
    dim, classes, n = 16, 3, 600
    basis = torch.linalg.qr(torch.randn(dim, 2 * classes, generator=g))[0].T.reshape(classes, 2, dim)
    labels = torch.randint(0, classes, (n,), generator=g)
    task = torch.randint(0, 2, (n,), generator=g)
    coef = torch.randn(n, 2, generator=g) * 2
    means = torch.randn(2, dim, generator=g) * 3              # a task-label offset the bank must ignore
    h = 0.3 * torch.randn(n, dim, generator=g) + means[task] + torch.einsum("nk,nkd->nd", coef, basis[labels])
    bank = ClassSubspaceBank(dim, classes, 2)
    bank.init_from_moments(h, labels, task)
    for c in range(classes):
        # the learned 2-D subspace is the planted one: the projector onto it keeps the planted basis
        q = torch.linalg.qr(bank.bank[c].detach().T)[0]
        kept = (basis[c] @ q).square().sum() / 2
        assert kept > 0.95, (c, float(kept))
    bank.eval()
    _, logits = bank(h - means[task])
    assert (logits.argmax(-1) == labels).float().mean() > 0.8   # the energies classify the nuisance
    with pytest.raises(ValueError):
        bank.init_from_moments(h, labels[:-1])


def test_marginal_and_split_logits():
    from purified_ops.recipe.learning import MarginalLogits, SplitLogits

    torch.manual_seed(0)
    joint = torch.randn(B, 8 * 3)
    marg = MarginalLogits((8, 3))
    o, f = marg(joint)
    p = joint.softmax(-1).reshape(B, 8, 3)
    assert torch.allclose(o.softmax(-1), p.sum(2), atol=1e-6) and torch.allclose(f.softmax(-1), p.sum(1), atol=1e-6)
    labels = torch.tensor([[0, 0], [2, 1], [7, 2]])
    assert marg.joint(labels).tolist() == [0, 7, 23]
    a, b = SplitLogits((8, 3))(joint[:, :11])
    assert torch.equal(a, joint[:, :8]) and torch.equal(b, joint[:, 8:11])
    with pytest.raises(ValueError):
        SplitLogits((8, 3))(joint)
    with pytest.raises(ValueError):
        marg(joint[:, :20])


def test_grating_data_labels_and_regimes():
    pytest.importorskip("sklearn")
    from purified_ops.recipe.demo import GRATING_ORIENTATIONS, GRATING_FREQUENCIES, TEST_SIZE, load_data, load_validation

    (x, y, lab), (xt, yt, labt) = load_data(200, 0, "correlated", rho=1.0, nuisance="grating")
    assert x.shape == (200, 64) and lab.shape == (200, 2) and labt.shape == (TEST_SIZE, 2)
    assert torch.equal(lab[:, 0], y % GRATING_ORIENTATIONS)             # rho=1: orientation follows the digit
    assert 0.05 < (labt[:, 0] == yt % GRATING_ORIENTATIONS).float().mean() < 0.2   # not at test (1/8)
    for labels in (lab, labt):
        assert set(labels[:, 0].tolist()) <= set(range(GRATING_ORIENTATIONS))
        assert set(labels[:, 1].tolist()) == set(range(len(GRATING_FREQUENCIES)))
    (_, y2, lab2), (xt2, _, labt2) = load_data(200, 0, "independent", nuisance="grating")
    assert (lab2[:, 0] == y2 % GRATING_ORIENTATIONS).float().mean() < 0.25
    assert len(set(lab2[:, 0].tolist())) == GRATING_ORIENTATIONS
    assert torch.equal(xt, xt2) and torch.equal(labt, labt2)             # one fixed test set
    xv, yv, lv = load_validation(100, 7, nuisance="grating")
    assert lv.shape == (len(xv), 2) and (lv[:, 0] == yv % GRATING_ORIENTATIONS).float().mean() < 0.25
    (xtex, _, tex), _ = load_data(200, 0, "independent")                 # the texture default as it was
    assert tex.dim() == 1 and not torch.equal(xtex, x)
    with pytest.raises(ValueError):
        load_data(50, 0, "independent", nuisance="stripes")


def test_grating_oracle_subspaces_contain_each_grating():
    from purified_ops import PurifyLayer
    from purified_ops.recipe.demo import add_grating, grating_basis, grating_span

    rng = np.random.default_rng(0)
    digits = rng.integers(0, 10, 300)
    gratings, labels = add_grating(np.zeros((300, 8, 8), np.float32), digits, rng, correlated=False, rho=0.0)
    g = torch.from_numpy(gratings)
    norm = g.norm(dim=-1)
    assert 0.3 * 4 < norm.min() and norm.max() < 0.6 * 8 * 1.5           # amplitude in [0.3, 0.6]
    own = torch.from_numpy(grating_basis(labels[:, 0], labels[:, 1]))    # [N, 2, 64]
    layer = PurifyLayer()
    assert (layer(g, own).norm(dim=-1) / norm).max() < 1e-3             # each image's own 2-D subspace
    span = torch.from_numpy(grating_span())
    assert span.shape == (32, 64)                                       # the numerical span of all gratings
    assert (layer(g, span[None]).norm(dim=-1) / norm).max() < 0.05
    exact = torch.from_numpy(grating_span(tol=0.0))
    assert exact.shape == (48, 64) and (layer(g, exact[None]).norm(dim=-1) / norm).max() < 1e-3
    other = torch.from_numpy(grating_basis((labels[:, 0] + 4) % 8, labels[:, 1]))
    assert (layer(g, other).norm(dim=-1) / norm).min() > 0.3            # another class's does not


def test_demo_per_sample_arm_shapes_and_determinism():
    pytest.importorskip("sklearn")
    from purified_ops.recipe.demo import BANK_K, build_arm, run_one

    plain, arm = build_arm("plain", 3, nuisance="grating"), build_arm("per_sample", 3, nuisance="grating")
    for a, b in zip(list(plain.network.parameters()) + list(plain.task_head.parameters()),
                    list(arm.network.parameters()) + list(arm.task_head.parameters())):
        assert torch.equal(a, b)                                 # same initial main network
    x = torch.rand(5, 64)
    out = arm(x)
    assert out.irrelevant_features.shape == (5, BANK_K, 64) and out.task_logits.shape == (5, 10)
    assert [t.shape for t in out.irrelevant_logits] == [(5, 8), (5, 3)]
    with torch.no_grad():                                      # each row purified against its own z
        z = out.irrelevant_features
        assert (out.purified.unsqueeze(1) * z).sum(-1).abs().max() < 1e-4
    kw = dict(steps=8, batch_size=16, lr=1e-3, irrelevant_weight=1.0, rho=0.9, nuisance="grating",
              schedule="two_stage", balance_irrelevant=True)
    a = run_one("per_sample", "correlated", 40, 1, **kw)
    assert a == run_one("per_sample", "correlated", 40, 1, **kw)
    assert 0.0 <= run_one("oracle_per_sample", "independent", 40, 1, **kw) <= 1.0
    with pytest.raises(ValueError):
        build_arm("per_sample", 0)                             # the texture demo has no such arm


def test_demo_cli_grating_tiny(tmp_path, capsys):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    from purified_ops.cli import main

    png = tmp_path / "grating.png"
    rc = main(["demo", "--nuisance", "grating", "--sizes", "20", "--default-size", "20", "--seeds", "2",
               "--steps", "3", "--plot", str(png), "--json", "--no-progress"])
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    obj = json.loads(lines[-1])
    assert obj["nuisance"] == "grating" and len(obj["purified_acc"]) == len(obj["oracle_per_sample_acc"]) == 2
    assert set(obj["goal_met_by_regime"]) == {"correlated", "independent"} and "vs_shared" in obj
    assert png.stat().st_size > 1000
    assert any("per_sample-shared" in line for line in lines) and any("oracle" in line for line in lines)


def test_fit_stage1_data_trains_the_irrelevant_branch_on_samples_without_task_labels():
    torch.manual_seed(0)
    x, y, t = make_data(n=16)
    pool_x, _, pool_t = make_data(n=24, seed=1)
    stage1 = (torch.cat([x, pool_x]), torch.cat([y, torch.full((24,), -1)]), torch.cat([t, pool_t]))

    def trained(stage1_data):
        torch.manual_seed(0)
        net = InputPurifiedNet(mlp(), LowRankProbe(IN, 2), nn.Linear(D, 3), nn.Linear(2, 4))
        hist = fit(net, (x, y, t), epochs=2, stage1_epochs=3, batch_size=8, schedule="two_stage", seed=0,
                   progress=False, balance_irrelevant=True, stage1_data=stage1_data)
        return net, hist

    with_pool, hist = trained(stage1)
    without, _ = trained(None)
    assert len(hist["stage1"]) == 3 and len(hist["stage2"]) == 2
    # the pool's 24 samples take part in the first stage: its directions differ from the training set's alone
    assert not torch.equal(with_pool.irrelevant_encoder.directions, without.irrelevant_encoder.directions)
    with pytest.raises(ValueError, match="two_stage"):
        fit(with_pool, (x, y, t), epochs=1, schedule="joint", progress=False, stage1_data=stage1)


def test_balancing_weights_give_samples_without_a_task_label_weight_one():
    from purified_ops.recipe.learning import balancing_tables, balancing_weights

    y, t = torch.tensor([0, 0, 0, 1]), torch.tensor([0, 0, 1, 1])
    tables = balancing_tables(y, t)
    w = balancing_weights(torch.tensor([0, -1, 1, -1]), torch.tensor([0, 1, 1, 0]), tables)
    assert torch.equal(w[[1, 3]], torch.ones(2))
    assert torch.equal(w[[0, 2]], balancing_weights(torch.tensor([0, 1]), torch.tensor([0, 1]), tables))


def test_demo_nuisance_pool_is_outside_every_split_and_follows_the_regime():
    pytest.importorskip("sklearn")
    from purified_ops.recipe.demo.data import _pool_draw, _split, _validation_draw, load_nuisance_pool

    _, target, test_idx, _, train_idx, _ = _split(100, 3)
    _, _, validation, _, _ = _validation_draw(100, 3)
    _, _, pool, _ = _pool_draw(100, 3, 400)
    assert len(pool) == len(set(pool)) == 400
    assert not set(pool) & (set(train_idx) | set(validation) | set(test_idx))
    x, labels = load_nuisance_pool(100, 3, "correlated", 400)
    assert x.shape == (400, 64) and labels.shape == (400, 2)
    follows = (labels[:, 0].numpy() == target[pool] % 8).mean()
    assert 0.85 < follows < 0.97                          # rho = 0.9, plus chance agreement
    _, labels = load_nuisance_pool(100, 3, "independent", 400)
    assert (labels[:, 0].numpy() == target[pool] % 8).mean() < 0.25
    # more than the 600 images left: the same digits again, each with a fresh grating
    _, _, big, _ = _pool_draw(100, 3, 1000)
    assert len(set(big)) == 600 and set(big) >= set(pool)


def test_demo_pool_and_cross_fitting_keep_the_main_network_on_the_training_images(monkeypatch):
    pytest.importorskip("sklearn")
    from purified_ops.recipe.demo import arms as demo

    seen = []
    fit_branch = demo._fit_irrelevant_branch

    def record(model, data, **kw):
        stage1 = kw.get("stage1_data")
        seen.append((len(data[0]), None if stage1 is None else len(stage1[0]), kw.get("fit_stage2", True)))
        return fit_branch(model, data, **kw)

    monkeypatch.setattr(demo, "_fit_irrelevant_branch", record)
    kw = dict(steps=4, batch_size=16, lr=1e-3, irrelevant_weight=1.0, rho=0.9, nuisance="grating",
              schedule="two_stage", balance_irrelevant=True)
    a = demo.run_one("per_sample", "correlated", 40, 1, nuisance_pool=30, **kw)
    assert seen == [(40, 70, True)]                       # stage 2: the 40 images; stage 1: plus the pool
    assert a == demo.run_one("per_sample", "correlated", 40, 1, nuisance_pool=30, **kw)
    seen.clear()
    demo.run_one("per_sample", "independent", 40, 1, cross_fit=4, **kw)
    # four banks, each fitted without its fold of 10, then the test images' bank on all 40
    assert seen == [(30, None, False)] * 4 + [(40, None, False)]
    seen.clear()
    demo.run_one("shared", "correlated", 40, 1, nuisance_pool=30, pool_labels="pseudo", **kw)
    assert seen == [(40, 70, True)]
    with pytest.raises(ValueError, match="digit label"):
        demo.run_one("per_sample", "correlated", 40, 1, nuisance_pool=30, pool_labels="none",
                     bank_centring="digit", **kw)


@pytest.mark.parametrize("argv, message", [
    (["--plot", "out.txt"], "its extension must name an image format matplotlib writes"),
    (["--k", "100000"], "argument --k: must be from 1 to 64, got 100000"),
    (["--bank-k", "65"], "argument --bank-k: must be from 1 to 64, got 65"),
    (["--nuisance-pool", "-1"], "argument --nuisance-pool: must be from 0 to 10000, got -1"),
])
def test_demo_cli_refuses_what_cannot_work_in_one_line(argv, message, capsys):
    pytest.importorskip("matplotlib")
    from purified_ops.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["demo", *argv])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_demo_cli_refuses_a_nuisance_pool_it_cannot_train_or_draw(capsys):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    from purified_ops.cli import main

    assert main(["demo", "--nuisance-pool", "10", "--schedule", "joint", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--schedule two_stage" in err and len(err.strip().splitlines()) == 1
    assert main(["demo", "--nuisance-pool", "10", "--sizes", "700", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "training-set sizes up to 699" in err and len(err.strip().splitlines()) == 1


def test_demo_cli_marks_the_arms_that_learn_from_the_pool(capsys):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    from purified_ops.cli import main

    rc = main(["demo", "--nuisance", "grating", "--sizes", "20", "--default-size", "20", "--seeds", "2",
               "--steps", "3", "--regime", "correlated", "--nuisance-pool", "30", "--plot", "", "--json",
               "--no-progress", "--jobs", "1"])
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    obj = json.loads(lines[-1])
    assert obj["nuisance_pool"] == 30 and obj["pool_arms"] == ["shared", "per_sample"]
    header = next(line for line in lines if "n_train" in line)
    assert "per_sample*" in header and "shared*" in header and "plain*" not in header
    assert any("30 images with nuisance labels only" in line for line in lines)
