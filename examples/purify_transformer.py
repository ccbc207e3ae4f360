"""Drop purification into a third-party network: a Hugging Face BERT (built from a tiny config,
nothing downloaded) whose hidden states are purified after chosen encoder layers, through
forward hooks, against K directions per sample that a small head makes from those states.

    python examples/purify_transformer.py        # trains a few steps on random tokens

The model's code is untouched: `attach_purification` registers one hook per layer, and
`Purifier.remove()` takes them out again. Needs `pip install transformers`.
"""
from __future__ import annotations

import torch
from torch import nn

from purified_ops import purify


class Purifier(nn.Module):
    """Purifies a [B, T, D] hidden state against K directions per sample, made by a linear head
    from the sample's mean hidden state (z [B, 1, K, D], shared by the sample's tokens)."""

    def __init__(self, hidden: int, k: int = 2, strength: float = 1.0, backend: str = "auto"):
        super().__init__()
        self.k, self.strength, self.backend = k, strength, backend
        self.head = nn.Linear(hidden, k * hidden)
        self.handles: list = []

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        z = self.head(h.mean(1)).view(h.shape[0], 1, self.k, h.shape[-1])
        return purify(h, z, strength=self.strength, backend=self.backend)

    def hook(self, module, args, output):
        # An encoder layer returns its hidden states, or a tuple that starts with them.
        if isinstance(output, tuple):
            return (self(output[0]),) + output[1:]
        return self(output)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def tiny_bert(seed: int = 0, hidden: int = 64, layers: int = 2):
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=128, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=2 * hidden, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, attn_implementation="eager")
    torch.manual_seed(seed)
    return BertModel(config, add_pooling_layer=False)


def attach_purification(model, layers=None, k: int = 2, backend: str = "auto") -> nn.ModuleList:
    """One Purifier after each chosen encoder layer (all by default); returns them (their heads
    are parameters to train with the model)."""
    blocks = model.encoder.layer
    chosen = range(len(blocks)) if layers is None else layers
    purifiers = nn.ModuleList()
    for i in chosen:
        p = Purifier(model.config.hidden_size, k=k, backend=backend)
        p.handles.append(blocks[i].register_forward_hook(p.hook))
        purifiers.append(p)
    return purifiers


class Classifier(nn.Module):
    """BERT with purified hidden states and a linear head on the first token."""

    def __init__(self, classes: int = 3, k: int = 2, backend: str = "auto", seed: int = 0):
        super().__init__()
        self.bert = tiny_bert(seed)
        torch.manual_seed(seed + 1)
        self.purifiers = attach_purification(self.bert, k=k, backend=backend)
        self.head = nn.Linear(self.bert.config.hidden_size, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.bert(input_ids=tokens).last_hidden_state[:, 0])


def main(steps: int = 20) -> float:
    torch.manual_seed(0)
    model = Classifier()
    tokens = torch.randint(0, 128, (16, 12))
    labels = torch.randint(0, 3, (16,))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for step in range(steps):
        loss = nn.functional.cross_entropy(model(tokens), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 5 == 0 or step == steps - 1:
            print(f"step {step:2d}  loss {loss.item():.4f}")
    return loss.item()


if __name__ == "__main__":
    main()
