"""Differing vocabularies: the output vocabulary, and every model's token rows permuted into it.

mergekit 0.1.5's rules (`tokenizer_source: base | union | <model>` and the `tokenizer:` section):

* the output tokenizer is the base's (`base`), a model's (`<model>`), or the base's with every
  other model's tokens appended (`union`: plain vocabulary tokens first, then added tokens, each
  in first-seen order, the first model's settings winning for an added token); the tokens named
  under `tokenizer.tokens` that it lacks are appended after that;
* before the merge method runs, each model's embedding and output-head rows are put in output
  token order; a token a model lacks gets (unless `tokenizer.tokens` says otherwise) the row of
  the only model of that tensor that has it, else the base's row, else the mean over the models
  that have it, else zero (with a warning); `force` uses the configured source for every model;
* `pad_to_multiple_of` rounds the row count up; the padding rows of each model are the mean of
  its aligned rows;
* a model's tokens at ids past its `vocab_size` (rows it does not have) are tokens it lacks; the
  base's tokenizer is trimmed of them (fast BPE only), so the output never names them.

Where mergekit's order is an accident we fix one: its models come from a Python set (random per
process) and a model's plain tokens from a hash map; we take the base first, then the models in
config order, and a model's tokens in id order. The "first model" (tokenizer base when there is
no `base_model`) is the first listed model, as our config donor is.

Where mergekit 0.1.5 fails we do the evident thing (README, deliberate differences). Everything
here is pure data once built (`Vocabulary`), so a plan holding it pickles to workers.
"""

from __future__ import annotations

import json
import logging
import tempfile
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from evomerge.errors import ConfigError, EvomergeError

LOG = logging.getLogger(__name__)

# A token's row source under `tokenizer.tokens`: ("model", ref), ("row", ref, row id), ("zero",), ("none",)
TokenSource = tuple


@dataclass(frozen=True)
class TokenRule:
    """One `tokenizer.tokens` entry, resolved to the output vocabulary."""

    token: str
    source: TokenSource
    force: bool
    field: str  # where it came from, for errors


@dataclass(frozen=True)
class Vocabulary:
    """The output vocabulary: row maps per model, the token rules and the output tokenizer."""

    tokens: tuple[str, ...]  # output token of each row id (before padding)
    size: int  # output rows, padding included
    rows: Mapping[str, bytes]  # model -> int64 per output row: that model's row, or -1 (lacks it)
    rules: Mapping[int, TokenRule]  # output row -> configured source
    tokenizer_files: Mapping[str, bytes]  # the output tokenizer, as save_pretrained writes it
    generation_donor: str  # model whose generation_config.json goes with the tokenizer
    tensors: Mapping[str, str | None] = field(default_factory=dict)  # aligned output tensor -> its base
    _fills: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    def row_map(self, model: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(self.rows[model]), dtype=torch.int64)

    @cached_property
    def _row_maps(self) -> dict[str, torch.Tensor]:
        return {model: self.row_map(model) for model in self.rows}

    def fills(self, models: Sequence[str], base: str | None) -> dict[int, tuple]:
        """Output row -> how a model lacking it (or every model, if forced) fills it, for one
        tensor's set of models: ("copy", model index, row), ("mean", ((index, row), ...)) or ("zero",).

        Raises ConfigError when a configured source cannot give the row."""
        key = (tuple(models), base)
        if key not in self._fills:
            self._fills[key] = self._compute_fills(list(models), base)
        return self._fills[key]

    def check(self, models: Sequence[str], base: str | None, row_counts: Sequence[int]) -> None:
        """Plan-time check of one tensor's fills: every configured source exists and every row it
        reads is inside its model's tensor (ConfigError otherwise)."""
        for row, fill in self.fills(models, base).items():
            if fill[0] == "copy" and not 0 <= fill[2] < row_counts[fill[1]]:
                rule = self.rules.get(row)
                raise ConfigError(
                    f"token row {fill[2]} is out of range for '{models[fill[1]]}' ({row_counts[fill[1]]} rows)",
                    field=f"{rule.field}.source" if rule else None,
                )

    def _compute_fills(self, models: list[str], base: str | None) -> dict[int, tuple]:
        maps = [self._row_maps[m] for m in models]
        present = torch.stack([m >= 0 for m in maps]) if maps else torch.zeros((0, len(self.tokens)), dtype=torch.bool)
        needed = ~present.all(dim=0)
        for row, rule in self.rules.items():
            if rule.force:
                needed[row] = True
        fills: dict[int, tuple] = {}
        for row in needed.nonzero().flatten().tolist():
            token = self.tokens[row]
            rule = self.rules.get(row)
            having = [i for i in range(len(models)) if maps[i][row] >= 0]
            if rule is not None:
                fills[row] = self._rule_fill(rule, models, maps, row)
            elif len(having) == 1:
                fills[row] = ("copy", having[0], int(maps[having[0]][row]))
            elif not having:
                LOG.warning("token %r is in no model: its rows are zero", token)
                fills[row] = ("zero",)
            elif base in models and maps[models.index(base)][row] >= 0:
                index = models.index(base)
                fills[row] = ("copy", index, int(maps[index][row]))
            else:
                fills[row] = ("mean", tuple((i, int(maps[i][row])) for i in having))
        return fills

    def _rule_fill(self, rule: TokenRule, models: list[str], maps: list[torch.Tensor], row: int) -> tuple:
        kind = rule.source[0]
        if kind == "zero":
            return ("zero",)
        if kind == "none":
            raise ConfigError(
                f"token {rule.token!r} needs a source (some models lack it, or it is forced)",
                field=f"{rule.field}.source",
            )
        model = rule.source[1]
        if model not in models:
            raise ConfigError(
                f"token {rule.token!r} takes its row from '{model}', which is not a source of the "
                "embedding or output head",
                field=f"{rule.field}.source",
            )
        index = models.index(model)
        if kind == "model":
            source_row = int(maps[index][row])
            if source_row < 0:
                raise ConfigError(f"token {rule.token!r} is not in model '{model}'", field=f"{rule.field}.source")
            return ("copy", index, source_row)
        return ("copy", index, rule.source[2])

    def align(self, models: Sequence[str], tensors: Sequence[torch.Tensor], base: str | None) -> list[torch.Tensor]:
        """Each model's vocabulary-first tensor (embedding or head) with its rows in output order."""
        fills = self.fills(models, base)
        # On the CPU whatever the math device: the padding rows' mean must not depend on where it
        # ran (a search on a GPU and its export must write the same bits).
        result_device = tensors[0].device
        tensors = [t.cpu() for t in tensors]
        dtype = tensors[0].dtype
        for tensor in tensors[1:]:
            dtype = torch.promote_types(dtype, tensor.dtype)
        device = tensors[0].device
        width = tensors[0].shape[1:]
        count = len(self.tokens)
        for fill in fills.values():
            if fill[0] == "copy" and not 0 <= fill[2] < tensors[fill[1]].shape[0]:
                raise EvomergeError(
                    f"token row {fill[2]} is out of range for model '{models[fill[1]]}' ({tensors[fill[1]].shape[0]} rows)"
                )
        defaults: dict[int, torch.Tensor] = {}
        for row, (kind, *args) in fills.items():
            if kind == "zero":
                defaults[row] = torch.zeros(width, dtype=dtype, device=device)
            elif kind == "copy":
                defaults[row] = tensors[args[0]][args[1]].to(dtype)
            else:  # the mean, summed in model order from zero as mergekit does
                total = torch.zeros(width, dtype=dtype, device=device)
                for index, source_row in args[0]:
                    total = total + tensors[index][source_row]
                total /= len(args[0])
                defaults[row] = total
        forced = torch.zeros(count, dtype=torch.bool)
        for row, rule in self.rules.items():
            forced[row] = rule.force
        fill_rows = torch.tensor(sorted(defaults), dtype=torch.int64)
        fill_values = torch.stack([defaults[r] for r in sorted(defaults)]) if defaults else None
        aligned = []
        for tensor, model in zip(tensors, models):
            row_map = self._row_maps[model]
            own = (row_map >= 0) & ~forced
            out = torch.empty((self.size, *width), dtype=dtype, device=device)
            # Every row gathered in one pass (a lacking row reads row 0 for now), then the others set.
            torch.index_select(tensor.to(dtype), 0, row_map.clamp(min=0), out=out[:count])
            lacking = (~own).nonzero().flatten()
            if len(lacking):
                out[lacking] = 0  # a row with no source stays zero, as in mergekit (never, in practice)
            if fill_values is not None:
                filled = ~own[fill_rows]
                out[fill_rows[filled]] = fill_values[filled]
            if self.size > count:
                out[count:] = torch.mean(out[:count], dim=0)
            aligned.append(out.to(result_device))
        return aligned


# -- building ---------------------------------------------------------------------------------


def config_vocab_size(config: Mapping[str, Any]) -> int | None:
    """The model's embedding rows as its config.json states them."""
    value = config.get("vocab_size")
    if value is None and isinstance(config.get("text_config"), dict):
        value = config["text_config"].get("vocab_size")
    return value if type(value) is int and value > 0 else None


def is_vocab_tensor(shape: Sequence[int], vocab_size: int | None) -> bool:
    """A tensor indexed by token along dim 0 (an input embedding or an output head): the one
    classification every vocabulary-aware path uses. Callers pass non-layer tensors only."""
    return vocab_size is not None and len(shape) == 2 and shape[0] == vocab_size


def load_tokenizer(path: Path) -> Any:
    """A model's tokenizer from its local folder (fast when possible), or None if it has none."""
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(str(path), use_fast=True, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds for "no tokenizer here"
        LOG.debug("no tokenizer in %s: %s", path, exc)
        return None


def _fresh_copy(tokenizer: Any) -> Any:
    """An independent copy (saved and reloaded, as mergekit builds its union from)."""
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return transformers.AutoTokenizer.from_pretrained(tmp, use_fast=True, local_files_only=True)


def _usable_vocab(vocab: Mapping[str, int], vocab_size: int | None) -> dict[str, int]:
    return {tok: i for tok, i in vocab.items() if vocab_size is None or i < vocab_size}


def _union(base_tok: Any, base_vocab: Mapping[str, int], tokenizers: Sequence[tuple[Any, dict, int | None]]) -> Any:
    """(tokenizer, its vocabulary, its rows) per model, the base first."""
    plain: dict[str, None] = {}
    added: dict[str, Any] = {}
    for tokenizer, vocab, vocab_size in tokenizers:
        limit = vocab_size if vocab_size is not None else len(vocab)
        for tok, i in sorted(vocab.items(), key=lambda kv: kv[1]):
            if i < limit:
                plain.setdefault(tok)
        for tok_id, info in sorted(tokenizer.added_tokens_decoder.items()):
            if tok_id >= limit:
                continue
            first = added.setdefault(info.content, info)
            if first is not info and repr(first) != repr(info):
                LOG.warning("token %r is added with different settings; the first model's are kept", info.content)
    out = _fresh_copy(base_tok)
    for tok in plain:
        if tok not in added and tok not in base_vocab:
            out.add_tokens(tok)
    for info in added.values():
        out.add_tokens(info)
    return out


def _trim(tokenizer: Any, vocab_size: int | None, what: str, file: object, field: str) -> Any:
    """The base tokenizer without the tokens its model has no rows for (ids >= vocab_size), as
    mergekit trims it: only a fast BPE tokenizer can be trimmed; its added tokens, vocabulary
    entries and the merges that read a dropped token go."""
    if vocab_size is None:
        return tokenizer
    ids = tokenizer.get_vocab()
    dropped = {tok for tok, i in ids.items() if i >= vocab_size}
    if not dropped:
        return tokenizer
    example = min(dropped, key=ids.__getitem__)
    reason = (
        f"{what}: its tokenizer has {len(dropped)} tokens beyond the model's vocab_size {vocab_size} (e.g. {example!r})"
    )
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(f"{reason} and no fast tokenizer to trim them from", file=file, field=field)
    data = json.loads(tokenizer.backend_tokenizer.to_str())
    kind = data["model"].get("type")
    if kind != "BPE":
        raise ConfigError(f"{reason}; only a BPE tokenizer can be trimmed, this one is {kind}", file=file, field=field)
    data["added_tokens"] = [entry for entry in data["added_tokens"] if entry["id"] < vocab_size]
    vocab = data["model"]["vocab"]
    for tok in dropped:
        vocab.pop(tok, None)

    prefix = data["model"].get("continuing_subword_prefix") or ""

    def keeps(merge: Any) -> bool:
        # A merge that reads a dropped token goes (mergekit's rule); so does one that makes a
        # dropped token, which mergekit keeps and the tokenizers library then refuses to load.
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        made = left + (right[len(prefix) :] if prefix and right.startswith(prefix) else right)
        return not {left, right, made} & dropped

    data["model"]["merges"] = [merge for merge in data["model"]["merges"] if keeps(merge)]
    import tokenizers

    tokenizer._tokenizer = tokenizers.Tokenizer.from_str(json.dumps(data))  # the backend, swapped
    return tokenizer


def build_vocabulary(
    *,
    source: str,
    paths: Mapping[str, Path],
    vocab_sizes: Mapping[str, int | None],
    models: Sequence[str],
    tokenizer_base: str,
    tokens: Mapping[str, Any] | None = None,
    pad_to_multiple_of: int | None = None,
    file: object = None,
    field: str = "tokenizer_source",
) -> Vocabulary:
    """The output vocabulary of a merge (see the module docstring).

    `models` are the merged models, base first when there is one; `tokenizer_base` is the base
    (or the first model); `source` is 'union', 'base' or a model reference; `tokens` maps a token
    to a config.mergekit_yaml.TokenEmbedding."""
    tokenizers: dict[str, Any] = {}
    base_tok = load_tokenizer(paths[tokenizer_base])
    if base_tok is None:
        raise ConfigError(
            f"'{tokenizer_base}' has no tokenizer to build the output vocabulary from", file=file, field=field
        )
    base_tok = _trim(base_tok, vocab_sizes.get(tokenizer_base), str(paths[tokenizer_base]), file, field)
    tokenizers[tokenizer_base] = base_tok
    for model in models:
        if model in tokenizers:
            continue
        tokenizer = load_tokenizer(paths[model])
        if tokenizer is None:
            LOG.warning("'%s' has no tokenizer: taking it to share the base's", model)
            tokenizer = base_tok
        tokenizers[model] = tokenizer
    by_object: dict[int, dict[str, int]] = {}  # get_vocab copies the whole vocabulary: once per tokenizer
    for tok in tokenizers.values():
        if id(tok) not in by_object:
            by_object[id(tok)] = tok.get_vocab()
    original = {m: by_object[id(tok)] for m, tok in tokenizers.items()}
    usable = {m: _usable_vocab(original[m], vocab_sizes.get(m)) for m in tokenizers}
    if source == "union":
        ordered = [tokenizer_base] + [m for m in models if m != tokenizer_base]
        out = _union(
            base_tok, original[tokenizer_base], [(tokenizers[m], original[m], vocab_sizes.get(m)) for m in ordered]
        )
        donor = tokenizer_base
    elif source == "base":
        out = base_tok  # `tokens` appended below land beyond the base's rows (usable is taken already)
        donor = tokenizer_base
    else:
        out = load_tokenizer(paths[source])
        if out is None:
            raise ConfigError(f"'{source}' has no tokenizer", file=file, field=field)
        donor = source
    vocab = out.get_vocab()
    missing = [tok for tok in tokens or {} if tok not in vocab]
    for tok in missing:
        out.add_tokens(tok)
    if missing:
        vocab = out.get_vocab()
    count = len(vocab)
    order = [""] * count
    for tok, i in vocab.items():
        if not 0 <= i < count:
            raise ConfigError(
                f"the output tokenizer's ids are not contiguous (token {tok!r} has id {i})", file=file, field=field
            )
        order[i] = tok
    size = count
    if pad_to_multiple_of and size % pad_to_multiple_of:
        size += pad_to_multiple_of - size % pad_to_multiple_of
    rows = {}
    for model in dict.fromkeys([*models, tokenizer_base]):
        rows[model] = array("q", (usable[model].get(tok, -1) for tok in order)).tobytes()
    rules = {}
    for tok, entry in (tokens or {}).items():
        rule_field = f"tokenizer.tokens.{tok}"
        rules[vocab[tok]] = TokenRule(tok, _rule_source(entry, original, rule_field, file), entry.force, rule_field)
    with tempfile.TemporaryDirectory() as tmp:
        out.save_pretrained(tmp)
        files = {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir()) if p.is_file()}
    return Vocabulary(
        tokens=tuple(order), size=size, rows=rows, rules=rules, tokenizer_files=files, generation_donor=donor
    )


def _rule_source(entry: Any, vocabs: Mapping[str, Mapping[str, int]], field: str, file: object) -> TokenSource:
    source = entry.source
    if source is None:
        return ("none",)
    if isinstance(source, str):
        if source not in vocabs:
            raise ConfigError(f"'{source}' is not one of the merged models", file=file, field=f"{field}.source")
        return ("model", source)
    if getattr(source, "kind", None) == "zero":
        return ("zero",)
    if source.model not in vocabs:
        raise ConfigError(f"'{source.model}' is not one of the merged models", file=file, field=f"{field}.source.model")
    if source.token_id is not None:
        return ("row", source.model, source.token_id)
    row = vocabs[source.model].get(source.token)
    if row is None:
        raise ConfigError(
            f"token {source.token!r} is not in '{source.model}'", file=file, field=f"{field}.source.token"
        )
    return ("row", source.model, row)


def load_output_tokenizer(vocab: Vocabulary) -> Any:
    """The output tokenizer as a transformers object (what a merged checkpoint will load)."""
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer(vocab, Path(tmp), None)
        return transformers.AutoTokenizer.from_pretrained(tmp, local_files_only=True)


def write_tokenizer(vocab: Vocabulary, out_dir: Path, generation_dir: Path | None) -> list[str]:
    """The output tokenizer's files (and the generation defaults of its donor)."""
    written = []
    for name, data in vocab.tokenizer_files.items():
        (Path(out_dir) / name).write_bytes(data)
        written.append(name)
    generation = Path(generation_dir) / "generation_config.json" if generation_dir else None
    if generation is not None and generation.is_file():
        (Path(out_dir) / "generation_config.json").write_bytes(generation.read_bytes())
        written.append("generation_config.json")
    return written
