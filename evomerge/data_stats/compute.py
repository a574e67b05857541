"""The statistics themselves: diagonal empirical Fisher and linear-layer input Gram matrices.

Both read a model (in eval mode, float32 or its own dtype) and a list of (context, continuation)
token pairs. Inputs follow lm-eval's loglikelihood layout: (context + continuation) cut to the
model's last `max_length + 1` tokens, the last token dropped, the continuation's log-probabilities
read from the last len(continuation) positions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from evomerge.data_stats.examples import Example


def _input_ids(example: Example, max_length: int, device: torch.device) -> torch.Tensor:
    context, continuation = example
    tokens = (list(context) + list(continuation))[-(max_length + 1) :][:-1]
    return torch.tensor([tokens], dtype=torch.long, device=device)


def _max_length(model: torch.nn.Module) -> int:
    return int(getattr(model.config, "max_position_embeddings", 2048) or 2048)


def continuation_logprob(model: torch.nn.Module, example: Example) -> torch.Tensor:
    """log p(continuation | context) under `model` (a 0-d tensor with a graph when grads are on)."""
    device = next(model.parameters()).device
    ids = _input_ids(example, _max_length(model), device)
    continuation = torch.tensor(example[1], dtype=torch.long, device=device)
    logits = model(ids).logits[0, -len(continuation) :].float()
    return torch.log_softmax(logits, dim=-1).gather(1, continuation[:, None]).sum()


def fisher_diagonal(model: torch.nn.Module, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
    """Parameter name -> mean over examples of (d log p(y|x) / d theta)^2 (float32).

    One example at a time (batch 1): each gradient is one example's, as the empirical Fisher
    needs, and memory stays at the model, its gradients and one float32 accumulator per tensor."""
    if not examples:
        raise ValueError("no examples to compute a Fisher from")
    params = {name: p for name, p in model.named_parameters() if p.is_floating_point()}
    totals = {name: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for name, p in params.items()}
    was_training = model.training
    model.eval()
    try:
        for example in examples:
            model.zero_grad(set_to_none=True)
            continuation_logprob(model, example).backward()
            for name, p in params.items():
                if p.grad is not None:
                    totals[name].addcmul_(p.grad.float(), p.grad.float())
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return {name: total / len(examples) for name, total in totals.items()}


def gram_matrices(model: torch.nn.Module, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
    """'<linear module>.weight' -> X^T X of that layer's inputs over every token of every example
    ([in, in], float32; accumulated in float64). Forward hooks, no gradients."""
    if not examples:
        raise ValueError("no examples to compute Gram matrices from")
    grams: dict[str, torch.Tensor] = {}
    handles = []

    def hook(name: str):
        def record(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            rows = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).to(torch.float64)
            if name not in grams:
                grams[name] = torch.zeros((rows.shape[1], rows.shape[1]), dtype=torch.float64, device=rows.device)
            grams[name].add_(rows.T @ rows)

        return record

    for module_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            handles.append(module.register_forward_hook(hook(f"{module_name}.weight")))
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for example in examples:
                model(_input_ids(example, _max_length(model), device))
    finally:
        for handle in handles:
            handle.remove()
    return {name: gram.float() for name, gram in grams.items()}
