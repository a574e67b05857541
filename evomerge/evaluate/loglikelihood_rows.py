"""Loglikelihood requests as model input rows, and one batched forward pass that scores them as HFLM does.

A row is what the model reads. A plain row is one request's tokens, as HFLM builds it: the last
`max_length + 1` tokens of context + continuation, less the last token. A packed row holds the
choices of a multiple-choice question that share a context: the context once, then each choice's
tokens, each choice seeing only the context and itself (a block attention mask and position ids
that restart after the context), so every scored token has exactly the inputs it has in its plain
row, and the context is computed once instead of once per choice.

Scoring follows HFLM `_loglikelihood_tokens`: right padding (a plain batch gets no attention mask,
as in HFLM), log-softmax over the vocabulary at the continuation's positions (in HFLM's
`softmax_dtype`), the sum of the continuation tokens' log-probabilities and whether each was the
argmax. Rows in different batches, or packed, can move a sum by float rounding (~1e-7).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

__all__ = ["Request", "Row", "RowTable", "forward_context", "score_rows"]


@dataclass(frozen=True)
class Row:
    """One model input row. Packed: `segments` (0: the shared context, i: choice i) and `positions` are set."""

    tokens: tuple[int, ...]
    segments: tuple[int, ...] | None = None
    positions: tuple[int, ...] | None = None

    @property
    def packed(self) -> bool:
        return self.segments is not None


@dataclass
class Request:
    """One loglikelihood request: the row it reads, where its continuation's logits sit in it, its tokens."""

    instance: Any  # lm-eval's Instance; its resps are refilled on every call
    row: int  # index into RowTable.rows
    logit_positions: tuple[int, ...]  # logits at logit_positions[j] predict continuation[j]
    context: list[int]
    continuation: list[int]


class RowTable:
    """The distinct rows of every request prepared so far, and lm-eval's order over them (longest first)."""

    def __init__(self, max_length: int, *, pack: bool):
        self.max_length = max_length
        self.pack = pack
        self.rows: list[Row] = []
        self._index: dict[Row, int] = {}
        self._rank: list[int] = []

    def add(self, tokenised: list[tuple[Any, list[int], list[int]]]) -> list[Request]:
        """Requests for (instance, context tokens, continuation tokens) of one doc; shared contexts packed."""
        by_context: dict[tuple[int, ...], list[tuple[Any, list[int], list[int]]]] = {}
        for entry in tokenised:
            by_context.setdefault(tuple(entry[1]), []).append(entry)
        requests = []
        for group in by_context.values():
            fits = all(len(context) + len(continuation) <= self.max_length + 1 for _, context, continuation in group)
            if self.pack and len(group) > 1 and fits:
                requests += self._add_packed(group)
            else:
                requests += [self._add_plain(*entry) for entry in group]
        return requests

    def _add_plain(self, instance: Any, context: list[int], continuation: list[int]) -> Request:
        tokens = tuple((context + continuation)[-(self.max_length + 1) :][:-1])
        length = len(tokens)
        positions = tuple(range(length - len(continuation), length))
        return Request(instance, self._row(Row(tokens)), positions, context, continuation)

    def _add_packed(self, group: list[tuple[Any, list[int], list[int]]]) -> list[Request]:
        context = group[0][1]
        tokens, segments, positions = list(context), [0] * len(context), list(range(len(context)))
        logit_positions = []
        for choice, (_, _, continuation) in enumerate(group, start=1):
            start = len(tokens)
            tokens += continuation[:-1]
            segments += [choice] * (len(continuation) - 1)
            positions += range(len(context), len(context) + len(continuation) - 1)
            # The first token is predicted by the context's last position, the rest by the choice's own.
            logit_positions.append((len(context) - 1, *range(start, start + len(continuation) - 1)))
        row = self._row(Row(tuple(tokens), tuple(segments), tuple(positions)))
        return [
            Request(instance, row, at, context, continuation)
            for (instance, _, continuation), at in zip(group, logit_positions, strict=True)
        ]

    def _row(self, row: Row) -> int:
        index = self._index.setdefault(row, len(self.rows))
        if index == len(self.rows):
            self.rows.append(row)
            self._rank = []
        return index

    def batches(self, requests: list[Request], batch_size: int) -> Iterator[tuple[list[Row], list[list[Request]]]]:
        """The rows `requests` read, longest first, in batches of at most `batch_size` requests (packed) or rows (plain)."""
        if len(self._rank) != len(self.rows):
            order = sorted(range(len(self.rows)), key=lambda i: (self.rows[i].packed, -len(self.rows[i].tokens)))
            self._rank = [0] * len(order)
            for rank, index in enumerate(order):
                self._rank[index] = rank
        by_row: dict[int, list[Request]] = {}
        for request in requests:
            by_row.setdefault(request.row, []).append(request)
        rows: list[Row] = []
        readers: list[list[Request]] = []
        for index in sorted(by_row, key=self._rank.__getitem__):
            row = self.rows[index]
            count = sum(len(r) for r in readers) if row.packed else len(rows)
            size = len(by_row[index]) if row.packed else 1
            if rows and (row.packed != rows[0].packed or count + size > batch_size):
                yield rows, readers
                rows, readers = [], []
            rows.append(row)
            readers.append(by_row[index])
        if rows:
            yield rows, readers


@contextmanager
def forward_context(lm: Any) -> Iterator[None]:
    """inference_mode, and HFLM's autocast when it has a mixed_precision_dtype."""
    import torch

    with (
        torch.inference_mode(),
        torch.autocast(
            device_type=lm.device.type,
            dtype=lm.mixed_precision_dtype,
            enabled=lm.mixed_precision_dtype is not None,
        ),
    ):
        yield


def takes(model: Any, argument: str) -> bool:
    """Whether the model's forward names `argument` (a catch-all **kwargs does not count)."""
    return argument in inspect.signature(model.forward).parameters


def score_rows(lm: Any, model: Any, rows: list[Row], readers: list[list[Request]]) -> list[list[tuple[float, bool]]]:
    """(logprob, is_greedy) of each reader of each row, from one forward pass over the padded batch."""
    import torch
    import torch.nn.functional as F

    width = max(len(row.tokens) for row in rows)
    inputs = torch.zeros((len(rows), width), dtype=torch.long)  # right padding with 0, as HFLM
    for slot, row in enumerate(rows):
        inputs[slot, : len(row.tokens)] = torch.tensor(row.tokens, dtype=torch.long)
    # Where each continuation token's logits sit: (slot, position, token, request, offset).
    slots, positions, targets, owners, offsets = [], [], [], [], []
    owner = 0
    for slot, row_readers in enumerate(readers):
        for request in row_readers:
            count = len(request.continuation)
            slots += [slot] * count
            positions += request.logit_positions
            targets += request.continuation
            owners += [owner] * count
            offsets += range(count)
            owner += 1
    first = min(positions)
    kwargs: dict[str, Any] = {}
    if takes(model, "use_cache"):
        kwargs["use_cache"] = False
    if rows[0].packed:
        kwargs.update(_packed_inputs(model, rows, width))
    if takes(model, "logits_to_keep"):  # only the positions read: the head and softmax skip the rest
        kwargs["logits_to_keep"] = torch.arange(first, width)
    kwargs = {name: value.to(lm.device) if isinstance(value, torch.Tensor) else value for name, value in kwargs.items()}
    logits = model(inputs.to(lm.device), **kwargs).logits
    if logits.shape[1] == width:
        logits = logits[:, first:]
    device = logits.device
    slots_t = torch.tensor(slots, device=device)
    positions_t = torch.tensor(positions, device=device) - first
    targets_t = torch.tensor(targets, device=device)
    logprobs = F.log_softmax(logits[slots_t, positions_t], dim=-1, dtype=lm.softmax_dtype)
    token_logprobs = logprobs.gather(1, targets_t.unsqueeze(1)).squeeze(1)
    greedy = logprobs.argmax(dim=-1) == targets_t
    longest = max(offsets) + 1
    owners_t, offsets_t = torch.tensor(owners, device=device), torch.tensor(offsets, device=device)
    sums = torch.zeros((owner, longest), dtype=token_logprobs.dtype, device=device)
    sums[owners_t, offsets_t] = token_logprobs
    all_greedy = torch.ones((owner, longest), dtype=torch.bool, device=device)
    all_greedy[owners_t, offsets_t] = greedy
    flat = list(zip(sums.sum(dim=1).tolist(), all_greedy.all(dim=1).tolist(), strict=True))
    results, start = [], 0
    for row_readers in readers:
        results.append(flat[start : start + len(row_readers)])
        start += len(row_readers)
    return results


def packing_supported(model: Any) -> bool:
    """Packed rows need an attention that takes a 4D mask and position ids (sdpa or eager)."""
    implementation = getattr(getattr(model, "config", None), "_attn_implementation", None)
    return implementation in ("sdpa", "eager") and takes(model, "attention_mask") and takes(model, "position_ids")


def _packed_inputs(model: Any, rows: list[Row], width: int) -> dict[str, Any]:
    """The 4D attention mask and position ids of a batch of packed rows (a padding token sees itself only)."""
    import torch

    allowed = torch.zeros((len(rows), 1, width, width), dtype=torch.bool)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    for slot, row in enumerate(rows):
        length = len(row.tokens)
        segments = torch.tensor(row.segments)
        same = (segments.unsqueeze(0) == 0) | (segments.unsqueeze(0) == segments.unsqueeze(1))
        allowed[slot, 0, :length, :length] = torch.ones((length, length), dtype=torch.bool).tril() & same
        pads = torch.arange(length, width)
        allowed[slot, 0, pads, pads] = True
        positions[slot, :length] = torch.tensor(row.positions)
    if model.config._attn_implementation == "eager":  # eager adds the mask to the scores
        dtype = next(model.parameters()).dtype
        mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    else:
        mask = allowed  # sdpa: True = attend
    return {"attention_mask": mask, "position_ids": positions}
