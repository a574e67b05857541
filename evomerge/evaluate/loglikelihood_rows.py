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
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

__all__ = ["Request", "Row", "RowTable", "call_options", "forward_context", "packing_supported", "score_rows"]


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
    # The same two as tensors, made once (a call only concatenates them).
    positions_tensor: torch.Tensor = field(init=False, repr=False)
    continuation_tensor: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.positions_tensor = torch.tensor(self.logit_positions, dtype=torch.long)
        self.continuation_tensor = torch.tensor(self.continuation, dtype=torch.long)


@dataclass(frozen=True)
class _RowTensors:
    """A row's tokens, and for a packed row its position ids and which tokens each token sees."""

    tokens: torch.Tensor
    positions: torch.Tensor | None = None
    sees: torch.Tensor | None = None  # [length, length] bool


def _row_tensors(row: Row) -> _RowTensors:
    tokens = torch.tensor(row.tokens, dtype=torch.long)
    if not row.packed:
        return _RowTensors(tokens)
    segments = torch.tensor(row.segments)
    # Causal, and within the shared context (segment 0) or the token's own choice.
    same = (segments.unsqueeze(0) == 0) | (segments.unsqueeze(0) == segments.unsqueeze(1))
    sees = torch.ones((len(row.tokens),) * 2, dtype=torch.bool).tril() & same
    return _RowTensors(tokens, torch.tensor(row.positions, dtype=torch.long), sees)


class RowTable:
    """The distinct rows of every request prepared so far, and lm-eval's order over them (longest first)."""

    def __init__(self, max_length: int, *, pack: bool):
        self.max_length = max_length
        self.pack = pack
        self.rows: list[Row] = []
        self.tensors: list[_RowTensors] = []
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
            self.tensors.append(_row_tensors(row))
            self._rank = []
        return index

    def batches(self, requests: list[Request], batch_size: int) -> Iterator[tuple[list[int], list[list[Request]]]]:
        """(row indices, each row's requests) of the rows `requests` read, longest first, at most
        `batch_size` requests (packed rows) or rows (plain rows) a batch."""
        if len(self._rank) != len(self.rows):
            order = sorted(range(len(self.rows)), key=lambda i: (self.rows[i].packed, -len(self.rows[i].tokens)))
            self._rank = [0] * len(order)
            for rank, index in enumerate(order):
                self._rank[index] = rank
        by_row: dict[int, list[Request]] = {}
        for request in requests:
            by_row.setdefault(request.row, []).append(request)
        rows: list[int] = []
        readers: list[list[Request]] = []
        count = 0
        for index in sorted(by_row, key=self._rank.__getitem__):
            packed = self.rows[index].packed
            size = len(by_row[index]) if packed else 1
            if rows and (packed != self.rows[rows[0]].packed or count + size > batch_size):
                yield rows, readers
                rows, readers, count = [], [], 0
            rows.append(index)
            readers.append(by_row[index])
            count += size
        if rows:
            yield rows, readers


@contextmanager
def forward_context(lm: Any) -> Iterator[None]:
    """inference_mode, and HFLM's autocast when it has a mixed_precision_dtype."""
    with (
        torch.inference_mode(),
        torch.autocast(
            device_type=lm.device.type,
            dtype=lm.mixed_precision_dtype,
            enabled=lm.mixed_precision_dtype is not None,
        ),
    ):
        yield


def call_options(model: Any) -> dict[str, bool]:
    """What the model's forward takes by name (a catch-all **kwargs does not count); looked up once per call."""
    parameters = inspect.signature(model.forward).parameters
    return {name: name in parameters for name in ("use_cache", "logits_to_keep", "attention_mask", "position_ids")}


def packing_supported(model: Any) -> bool:
    """Packed rows need an attention that takes a 4D mask, and position ids (sdpa or eager)."""
    implementation = getattr(getattr(model, "config", None), "_attn_implementation", None)
    options = call_options(model)
    return implementation in ("sdpa", "eager") and options["attention_mask"] and options["position_ids"]


def score_rows(
    lm: Any, model: Any, table: RowTable, rows: list[int], readers: list[list[Request]], options: dict[str, bool]
) -> list[list[tuple[float, bool]]]:
    """(logprob, is_greedy) of each reader of each row, from one forward pass over the padded batch."""
    tensors = [table.tensors[index] for index in rows]
    inputs = pad_sequence([t.tokens for t in tensors], batch_first=True, padding_value=0)  # right padding, as HFLM
    width = inputs.shape[1]
    requests = [request for row_readers in readers for request in row_readers]
    # Each continuation token: the row (slot) and position whose logits predict it, its request and place there.
    lengths = torch.tensor([len(request.continuation) for request in requests])
    per_row = torch.tensor([sum(len(request.continuation) for request in row_readers) for row_readers in readers])
    slots = torch.repeat_interleave(torch.arange(len(rows)), per_row)
    positions = torch.cat([request.positions_tensor for request in requests])
    targets = torch.cat([request.continuation_tensor for request in requests])
    owners = torch.repeat_interleave(torch.arange(len(requests)), lengths)
    offsets = torch.arange(len(targets)) - torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths, lengths)
    first = int(positions.min())

    kwargs: dict[str, Any] = {}
    if options["use_cache"]:
        kwargs["use_cache"] = False
    if table.rows[rows[0]].packed:
        kwargs.update(_packed_inputs(model, tensors, width))
    if options["logits_to_keep"]:  # only the positions read: the head and softmax skip the rest
        kwargs["logits_to_keep"] = torch.arange(first, width)
    kwargs = {name: value.to(lm.device) if isinstance(value, torch.Tensor) else value for name, value in kwargs.items()}
    logits = model(inputs.to(lm.device), **kwargs).logits
    if logits.shape[1] == width:
        logits = logits[:, first:]
    device = logits.device
    targets = targets.to(device)
    logprobs = F.log_softmax(logits[slots.to(device), (positions - first).to(device)], dim=-1, dtype=lm.softmax_dtype)
    token_logprobs = logprobs.gather(1, targets.unsqueeze(1)).squeeze(1)
    greedy = logprobs.argmax(dim=-1) == targets
    owners, offsets = owners.to(device), offsets.to(device)
    longest = int(lengths.max())
    sums = torch.zeros((len(requests), longest), dtype=token_logprobs.dtype, device=device)
    sums[owners, offsets] = token_logprobs
    all_greedy = torch.ones((len(requests), longest), dtype=torch.bool, device=device)
    all_greedy[owners, offsets] = greedy
    flat = list(zip(sums.sum(dim=1).tolist(), all_greedy.all(dim=1).tolist(), strict=True))
    results, start = [], 0
    for row_readers in readers:
        results.append(flat[start : start + len(row_readers)])
        start += len(row_readers)
    return results


def _packed_inputs(model: Any, tensors: list[_RowTensors], width: int) -> dict[str, torch.Tensor]:
    """The 4D attention mask and position ids of a batch of packed rows (a padding token sees itself only)."""
    sees = torch.zeros((len(tensors), 1, width, width), dtype=torch.bool)
    positions = torch.zeros((len(tensors), width), dtype=torch.long)
    for slot, row in enumerate(tensors):
        length = len(row.tokens)
        sees[slot, 0, :length, :length] = row.sees
        positions[slot, :length] = row.positions
    lengths = torch.tensor([len(row.tokens) for row in tensors])
    diagonal = torch.arange(width)
    sees[:, 0, diagonal, diagonal] |= diagonal.unsqueeze(0) >= lengths.unsqueeze(1)
    if model.config._attn_implementation == "eager":  # eager adds the mask to the scores
        dtype = next(model.parameters()).dtype
        return {
            "attention_mask": torch.zeros(sees.shape, dtype=dtype).masked_fill(~sees, torch.finfo(dtype).min),
            "position_ids": positions,
        }
    return {"attention_mask": sees, "position_ids": positions}  # sdpa: True = attend
