"""Router rows: one unit vector per expert and layer, placed where that expert's prompts land.

The initialisations are mergekit-moe 0.1.5's, so a recipe gives the same router in both tools:

- `hidden`: the base model reads each prompt (BOS first, left-padded with BOS, one batch per
  prompt list, in bfloat16 as mergekit runs it). For layer i the prompt's vector is the hidden
  state entering layer i at the last position; a prompt list's vector is the mean over its
  prompts; the row is (positive mean - negative mean), L2-normalised. Done in bfloat16 in the
  same order, the rows agree with mergekit's bit for bit.
- `cheap_embed`: the sum of the prompts' token embeddings (BOS included, float32), normalised;
  negative prompts' normalised sum is subtracted and the difference normalised again. The same
  row for every layer; no forward pass.
- `random`: standard normal rows from `seed` (mergekit draws them unseeded).

Everything here but `base_hidden_states` is tensor math with no reading.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

NORM_FLOOR = 1e-8  # a zero difference (identical prompt sets) stays zero instead of NaN


def unit_rows(vectors: torch.Tensor) -> torch.Tensor:
    """Each row (last dim) divided by its L2 norm, floored at NORM_FLOOR; in the input dtype."""
    return vectors / vectors.norm(p=2, dim=-1, keepdim=True).clamp(min=NORM_FLOOR)


def last_token_mean(states: torch.Tensor) -> torch.Tensor:
    """(layers, prompts, positions, hidden) -> (layers, hidden): the last position (the prompts
    are left-padded, so it is each prompt's last token), averaged over prompts as sum / count."""
    last = states[:, :, -1, :]
    return last.sum(dim=1) / last.shape[1]


def embedding_sum(embed: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(1, hidden): the float32 sum of every unpadded token's embedding, normalised."""
    rows = embed.float()[input_ids]  # (prompts, positions, hidden)
    summed = (rows * attention_mask.unsqueeze(-1)).sum(dim=1).sum(dim=0, keepdim=True)
    return unit_rows(summed)


def router_rows(
    experts: Sequence[tuple[Sequence[Sequence[int]], Sequence[Sequence[int]]]],
    prompt_vectors: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    pad_id: int,
) -> torch.Tensor:
    """(layers, experts, hidden): each expert's (positive - negative) prompt vector, normalised.

    `experts` holds each expert's positive and negative prompts as token ids (BOS included);
    `prompt_vectors(input_ids, attention_mask)` gives a (layers, hidden) vector for one batch."""
    rows = []
    for positive, negative in experts:
        vector = prompt_vectors(*left_padded(positive, pad_id))
        if negative:
            vector = vector - prompt_vectors(*left_padded(negative, pad_id))
        rows.append(unit_rows(vector))
    return torch.stack(rows, dim=1)


def left_padded(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> (input_ids, attention_mask), padded on the left to the longest."""
    width = max(len(ids) for ids in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        if ids:
            input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            mask[row, width - len(ids) :] = 1
    return input_ids, mask


def random_rows(layers: int, experts: int, hidden: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((layers, experts, hidden), generator=generator)


def base_hidden_states(model) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """`prompt_vectors` for `hidden` gates: the loaded base model's states entering each layer."""

    def prompt_vectors(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            output = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        return last_token_mean(torch.stack(output.hidden_states[:-1]))  # the last entry is after the final norm

    return prompt_vectors
