"""Two tiny Llamas trained from different seeds on one task: the case Git Re-Basin is for.

Used by the alignment test and `benchmarks/rebasin.py` to measure the loss barrier on the linear
path between the two models before and after `weight_matching`. Two next-token tasks:
- `successor`: x_t = T[x_(t-1)] for one fixed random permutation T of the vocabulary (a lookup
  the embedding, MLP and head learn);
- `arithmetic`: x_t = (x_0 + t * d) mod vocab: the model must read the step d off the first two
  tokens, through attention (several algorithms solve it, so two seeds may differ by more than a
  permutation).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch


@dataclass(frozen=True)
class ToyTask:
    kind: Literal["successor", "arithmetic"] = "successor"
    vocab: int = 64
    length: int = 12  # tokens per sequence
    max_step: int = 7  # arithmetic: d is drawn from 1 .. max_step
    table_seed: int = 99  # successor: the seed of T


def toy_config(task: ToyTask = ToyTask(), *, hidden: int = 32, layers: int = 2, intermediate: int = 64):
    """A transformers LlamaConfig of the tiny model (4 heads, 2 key/value heads)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=task.vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=task.length,
        tie_word_embeddings=False,
    )


def sequences(task: ToyTask, count: int, *, seed: int) -> torch.Tensor:
    """`count` sequences of the task (count, length), their first tokens drawn with `seed`."""
    generator = torch.Generator().manual_seed(seed)
    start = torch.randint(0, task.vocab, (count, 1), generator=generator)
    if task.kind == "arithmetic":
        step = torch.randint(1, task.max_step + 1, (count, 1), generator=generator)
        return (start + step * torch.arange(task.length)) % task.vocab
    successor = torch.randperm(task.vocab, generator=torch.Generator().manual_seed(task.table_seed))
    tokens = [start]
    for _ in range(task.length - 1):
        tokens.append(successor[tokens[-1]])
    return torch.cat(tokens, dim=1)


def next_token_loss(model, batch: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the tokens from the third on (the first two fix the sequence)."""
    logits = model(batch[:, :-1]).logits[:, 1:]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 2:].reshape(-1))


def train(config, data: torch.Tensor, *, seed: int, steps: int = 300, batch: int = 64, lr: float = 3e-3):
    """A LlamaForCausalLM initialised with `seed` and trained on `data` (same batches for every seed)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    order = torch.Generator().manual_seed(1234)
    model.train()
    for _ in range(steps):
        rows = torch.randint(0, data.shape[0], (batch,), generator=order)
        loss = next_token_loss(model, data[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def interpolation_losses(
    config, a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], data: torch.Tensor, alphas: Sequence[float]
) -> list[float]:
    """Loss on `data` of (1 - alpha) * A + alpha * B for each alpha."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(config).eval()
    losses = []
    with torch.no_grad():
        for alpha in alphas:
            model.load_state_dict({name: (1 - alpha) * a[name] + alpha * b[name] for name in a})
            losses.append(float(next_token_loss(model, data)))
    return losses


def barrier(losses: Sequence[float]) -> float:
    """Midpoint loss above the mean of the endpoints (losses at alpha 0, ..., 0.5, ..., 1)."""
    return losses[len(losses) // 2] - (losses[0] + losses[-1]) / 2
