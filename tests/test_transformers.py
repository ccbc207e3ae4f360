"""A real third-party model: a tiny Hugging Face BERT (from a config, no download) with its hidden
states purified through forward hooks (examples/purify_transformer.py): fused equals reference,
torch.compile without graph breaks, CPU bfloat16 autocast, and the example script itself."""
import importlib.util
import pathlib
import runpy

import pytest
import torch

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "purify_transformer.py"


def _example():
    spec = importlib.util.spec_from_file_location("purify_transformer", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def example():
    return _example()


def _batch():
    g = torch.Generator().manual_seed(5)
    return torch.randint(0, 128, (4, 10), generator=g), torch.randint(0, 3, (4,), generator=g)


def _loss_and_grads(model, tokens, labels):
    logits = model(tokens)
    loss = torch.nn.functional.cross_entropy(logits, labels)
    names, params = zip(*model.named_parameters())
    return logits, dict(zip(names, torch.autograd.grad(loss, params)))


def test_hooks_purify_every_layer_and_remove_cleanly(example):
    model = example.Classifier()
    tokens, _ = _batch()
    seen = []
    for p in model.purifiers:
        p.register_forward_hook(lambda m, args, out: seen.append((m, args[0], out)))
    model(tokens)
    assert len(seen) == 2  # one purified state per encoder layer
    for p, h, y in seen:  # each orthogonal to its sample's K = 2 directions
        z = p.head(h.mean(1)).view(h.shape[0], 1, 2, h.shape[-1])
        assert y.shape == h.shape
        assert (y.unsqueeze(-2) * z).sum(-1).abs().max() < 1e-3 * h.abs().max() * z.abs().max()
    for p in model.purifiers:
        p.remove()
    plain = example.tiny_bert()(input_ids=tokens).last_hidden_state
    torch.testing.assert_close(model.bert(input_ids=tokens).last_hidden_state, plain)


def test_fused_equals_reference_forward_and_gradients(example):
    tokens, labels = _batch()
    fused_logits, fused = _loss_and_grads(example.Classifier(backend="auto"), tokens, labels)
    ref_logits, ref = _loss_and_grads(example.Classifier(backend="reference"), tokens, labels)
    torch.testing.assert_close(fused_logits, ref_logits)
    assert any("purifiers" in name and g.abs().max() > 0 for name, g in fused.items())  # dz reaches the heads
    for name in ref:
        torch.testing.assert_close(fused[name], ref[name], msg=name)


def test_torch_compile_without_graph_breaks(example):
    torch._dynamo.reset()
    model = example.Classifier()
    tokens, labels = _batch()
    eager_logits, eager = _loss_and_grads(model, tokens, labels)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # fullgraph: a break raises
    logits, grads = _loss_and_grads(compiled, tokens, labels)
    torch.testing.assert_close(logits, eager_logits)
    for name in eager:
        torch.testing.assert_close(grads[name.replace("_orig_mod.", "")] if name in grads else grads["_orig_mod." + name],
                                   eager[name], msg=name)


def test_cpu_bfloat16_autocast(example):
    tokens, labels = _batch()
    results = []
    for backend in ("auto", "reference"):
        model = example.Classifier(backend=backend)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits, grads = _loss_and_grads(model, tokens, labels)
        assert torch.isfinite(logits).all() and all(torch.isfinite(g).all() for g in grads.values())
        results.append(logits.float())
    fp32_logits = example.Classifier()(tokens)
    # Both backends compute in float32 from the same bfloat16 states: they agree far more
    # closely than either agrees with the float32 model.
    torch.testing.assert_close(results[0], results[1], atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(results[0], fp32_logits, atol=0.1, rtol=0.1)


def test_example_script_runs_and_learns(capsys):
    runpy.run_path(str(EXAMPLE), run_name="__main__")
    lines = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("step")]
    first, last = float(lines[0][-1]), float(lines[-1][-1])
    assert len(lines) >= 2 and last < first
