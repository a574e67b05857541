"""A layer path as a standard checkpoint: the path's layers copied in order, the step scales folded in.

A standard Llama has no place for a scale on the hidden state entering a layer, but it needs none.
Every sub-block of a pre-norm layer reads the residual stream through an RMSNorm, and
RMSNorm(c*x) = RMSNorm(x) for any c > 0 (up to its epsilon). Write s_k for the scale entering step
k, P_k = s_1 * ... * s_k, h_k for the in-memory stream after step k (h_0 the embeddings), and
u_k = s_k * h_{k-1} for step k's true input. A step computes
    m_k = u_k + A_k(N1(u_k)),   h_k = m_k + M_k(N2(m_k))
with A_k ending in o_proj and M_k in down_proj (both linear in their weight and bias).
Claim: the exported model, whose step k has o_proj and down_proj multiplied by 1/P_k and which
starts from the same z_0 = h_0, carries z_k = h_k / P_k. By induction, its step-k input is
z_{k-1} = h_{k-1} / P_{k-1} = u_k / P_k, so N1 sees the same normalised input, the scaled o_proj
gives A_k(N1(u_k)) / P_k, and the mid stream is m_k / P_k; likewise N2 sees m_k and the scaled
down_proj adds M_k(N2(m_k)) / P_k, giving h_k / P_k. The final norm is scale invariant too, so
the logits are the same. Epsilon: RMSNorm(x/P) = x / sqrt(mean(x^2) + eps*P^2), against
x / sqrt(mean(x^2) + eps), a relative change of about eps*|P^2 - 1| / (2*mean(x^2)).

This needs the layer to be pre-norm with nothing between its output projections and the residual
add: every child with weights is a norm (RMSNorm or LayerNorm, both scale invariant) or a block
ending in one of RESIDUAL_WRITERS (o_proj/down_proj in Llama, Mistral, Qwen, Gemma, Phi-3,
StableLM, the MoE experts of Mixtral and Qwen-MoE; c_proj in GPT-2; dense/dense_4h_to_h in GPT-NeoX
and Falcon; dense/fc2 in Phi). Parallel blocks (GPT-NeoX, Falcon, Phi) fold the same way.

Sandwich layers (Gemma 2/3) normalise each sub-block's output before the residual add:
m_k = u_k + N1'(A_k(N1(u_k))), and N1' ignores any scale of its input, so scaling o_proj does
nothing. The division by P_k goes into N1' (and N2', after the MLP) instead: the norm's output is
normalised(a) * g(w), with g(w) = w or 1 + w (Gemma's parametrisation, probed from the module),
so the folded weight is w' = g^-1(g(w) / P_k). The induction above is otherwise unchanged.
Any other layer structure is refused when its factor is not 1.

`path_state_dict` is the one description of the exported tensors: export writes it and the
search hashes it, so the hash recorded for a scored candidate is the exported checkpoint's.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from evomerge.dataflow.path import LayerPath
from evomerge.dataflow.path_model import check_path, decoder_layers, path_config
from evomerge.io.hashing import checkpoint_hash, weights_hash
from evomerge.merge.layout import LayerLayout, split_layers

# The modules that write a pre-norm layer's sub-blocks into the residual stream, by their path in
# the layer as transformers 5 names them: each sub-block's output is linear in these (an MoE block's
# experts and shared expert alike), so scaling them scales what the layer adds.
RESIDUAL_WRITERS = frozenset(
    {
        "self_attn.o_proj",  # Llama, Mistral, Qwen, Gemma, Phi-3, StableLM, Mixtral, ...
        "mlp.down_proj",
        "mlp.experts.down_proj",  # fused experts (Mixtral, Qwen-MoE)
        "mlp.shared_expert.down_proj",  # Qwen2-MoE's shared expert
        "attn.c_proj",  # GPT-2
        "mlp.c_proj",
        "attention.dense",  # GPT-NeoX
        "self_attention.dense",  # Falcon
        "mlp.dense_4h_to_h",  # GPT-NeoX, Falcon
        "self_attn.dense",  # Phi
        "mlp.fc2",
    }
)
# A sandwich layer's children (Gemma 2/3): its output norms, applied before each residual add, take the fold.
_SANDWICH_CHILDREN = frozenset(
    {
        "self_attn",
        "mlp",
        "input_layernorm",
        "post_attention_layernorm",
        "pre_feedforward_layernorm",
        "post_feedforward_layernorm",
    }
)
_OUTPUT_NORMS = ("post_attention_layernorm", "post_feedforward_layernorm")


def _writer(suffix: str) -> bool:
    """Whether a layer tensor (`self_attn.o_proj.weight`, `mlp.experts.down_proj`) belongs to a residual writer."""
    return suffix in RESIDUAL_WRITERS or suffix.rsplit(".", 1)[0] in RESIDUAL_WRITERS


def _is_norm(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower()


@dataclass(frozen=True)
class LayerFold:
    """How a step's fold factor enters its tensors: `scaled` suffixes map t to (t + offset) * f - offset."""

    scaled: frozenset[str]
    offset: float = 0.0  # 1.0 for norms whose gain is 1 + w

    def apply(self, tensor: torch.Tensor, factor: float) -> torch.Tensor:
        """One of the `scaled` tensors with fold factor `factor` carried into it."""
        folded = (tensor.to(torch.float32) + self.offset) * factor - self.offset
        return folded.to(tensor.dtype)


def _gain_offset(norm: nn.Module) -> float:
    """0 when the norm's gain is its weight w, 1 when it is 1 + w (Gemma): probed on a unit input."""
    weight = norm.weight.detach()
    probe = torch.ones(1, weight.shape[-1], dtype=weight.dtype, device=weight.device)
    with torch.no_grad():
        out = norm(probe).to(torch.float32).reshape(-1)
    gain = weight.to(torch.float32).reshape(-1)
    for offset in (0.0, 1.0):
        if torch.allclose(out, gain + offset, rtol=1e-3, atol=1e-3):
            return offset
    raise ValueError(
        f"{type(norm).__name__}: its gain is neither w nor 1 + w, so a step scale cannot be folded into it"
    )


def _saved_names(model: nn.Module) -> list[str]:
    """The tensor names `save_pretrained` writes (tied copies left out)."""
    names = list(model.state_dict())
    if model.config.tie_word_embeddings:
        tied = getattr(model, "_tied_weights_keys", None) or ()
        names = [name for name in names if name not in set(tied)]
    return names


def layer_fold(model: nn.Module, source: str, layer: int, suffixes: tuple[str, ...]) -> LayerFold:
    """Where a step scale folds into layer `layer` of `source` (ValueError naming it where it cannot).

    Pre-norm: every child with weights is a norm or a sub-block holding a residual writer, so the
    blocks read the stream only through norms. Sandwich: Gemma 2/3's six children. Anything else
    (a post-norm layer such as OLMo 2's, whose blocks read the raw stream) cannot carry a scale.
    """
    module = decoder_layers(model)[layer]
    children = {name: child for name, child in module.named_children() if any(True for _ in child.parameters())}
    if "post_feedforward_layernorm" in children:
        if set(children) == _SANDWICH_CHILDREN:
            offsets = {_gain_offset(children[norm]) for norm in _OUTPUT_NORMS}
            if len(offsets) == 1:
                return LayerFold(frozenset(f"{norm}.weight" for norm in _OUTPUT_NORMS), offset=offsets.pop())
    else:
        writers = frozenset(suffix for suffix in suffixes if _writer(suffix))
        blocks = {suffix.split(".", 1)[0] for suffix in writers}
        others = [name for name, child in children.items() if name not in blocks and not _is_norm(child)]
        if writers and not others and len(blocks) < len(children):
            return LayerFold(writers)
    raise ValueError(
        f"{source} layer {layer}: its step scale cannot be folded into the weights (a {type(module).__name__} is "
        "neither a pre-norm layer whose blocks end in a known output projection nor a Gemma-style sandwich "
        "layer); use genome.scale: none for these models"
    )


def check_foldable(sources: Mapping[str, nn.Module]) -> None:
    """Before a search whose paths carry scales: every layer of `sources` can take one at export
    (CompatibilityError naming the first that cannot)."""
    from evomerge.errors import CompatibilityError

    for name, model in sources.items():
        layout = split_layers(_saved_names(model), source=name)
        for layer, suffixes in layout.layers.items():
            try:
                layer_fold(model, name, layer, suffixes)
            except ValueError as error:
                raise CompatibilityError(str(error)) from None


class PathStateDict(Mapping[str, torch.Tensor]):
    """The exported tensors of a path by name, each fetched (and folded) when asked for.

    Unfolded tensors are the sources' own; a folded one is computed on access, so hashing or
    writing a path holds one extra tensor at a time.
    """

    def __init__(self, path: LayerPath, sources: Mapping[str, nn.Module]):
        check_path(path, sources)
        self._states = {name: sources[name].state_dict(keep_vars=False) for name in path.models}
        layouts: dict[str, LayerLayout] = {
            name: split_layers(_saved_names(sources[name]), source=name) for name in path.models
        }
        factors = path.fold_factors()
        self.folds: list[LayerFold | None] = []  # per step: the rule its fold factor follows (None: factor 1)
        # output name -> (source model, source tensor name, fold factor, the rule folding it or None)
        self._origin: dict[str, tuple[str, str, float, LayerFold | None]] = {}
        for name in layouts[path.embed_from].pre:
            self._origin[name] = (path.embed_from, name, 1.0, None)
        prefix = layouts[path.embed_from].prefix
        for index, (step, factor) in enumerate(zip(path.steps, factors)):
            layout = layouts[step.model]
            suffixes = layout.layers[step.layer]
            fold = layer_fold(sources[step.model], step.model, step.layer, suffixes) if factor != 1.0 else None
            self.folds.append(fold)
            for suffix in suffixes:
                folds = fold is not None and suffix in fold.scaled
                self._origin[f"{prefix}.{index}.{suffix}"] = (
                    step.model,
                    layout.layer_tensor(step.layer, suffix),
                    factor if folds else 1.0,
                    fold if folds else None,
                )
        for name in layouts[path.head_from].post:
            self._origin[name] = (path.head_from, name, 1.0, None)
        # checkpoint name -> (output module name, where it sits in that tensor): what transformers 5
        # writes (GPT-NeoX's embed_out for the module's lm_head, Mixtral's per-expert w1/w2/w3 for
        # slices of the fused experts), as save_pretrained would write the path model.
        self._named: dict[str, tuple[str, tuple | None]] = {}
        geometry = {name: _by_module(sources[name]) for name in path.models}
        for out_name, (model, source_name, _, _) in self._origin.items():
            placed = geometry[model].get(source_name)
            if placed is None:
                self._named[out_name] = (out_name, None)
                continue
            for checkpoint_name, size, stride, offset in placed:
                identity = checkpoint_name == source_name and len(placed) == 1
                self._named[_relayer(checkpoint_name, out_name)] = (
                    out_name,
                    None if identity else (size, stride, offset),
                )

    def source_tensor(self, name: str) -> torch.Tensor:
        """The unfolded source tensor behind `name` (its shape and dtype are the output's)."""
        out_name, where = self._named[name]
        model, source_name, _, _ = self._origin[out_name]
        return _place(self._states[model][source_name].detach(), where)

    def __getitem__(self, name: str) -> torch.Tensor:
        out_name, where = self._named[name]
        model, source_name, factor, fold = self._origin[out_name]
        tensor = self._states[model][source_name].detach()
        return _place(tensor if fold is None else fold.apply(tensor, factor), where)

    def __iter__(self) -> Iterator[str]:
        return iter(self._named)

    def __len__(self) -> int:
        return len(self._named)


def _by_module(model: nn.Module) -> dict[str, list[tuple[str, tuple, tuple, int]]]:
    """Module tensor name -> the checkpoint tensors inside it (transformers' save-time names)."""
    from evomerge.merge.resident import checkpoint_geometry

    placed: dict[str, list[tuple[str, tuple, tuple, int]]] = {}
    for checkpoint_name, (module_name, size, stride, offset) in checkpoint_geometry(model, _saved_names(model)).items():
        placed.setdefault(module_name, []).append((checkpoint_name, size, stride, offset))
    return placed


def _relayer(checkpoint_name: str, out_name: str) -> str:
    """`checkpoint_name` (a source layer's) with the layer index of the output tensor `out_name`."""
    source = _LAYER_INDEX.match(checkpoint_name)
    target = _LAYER_INDEX.match(out_name)
    if source is None or target is None:
        return checkpoint_name
    return f"{source.group(1)}.{target.group(2)}.{checkpoint_name[source.end() :]}"


_LAYER_INDEX = re.compile(r"^((?:.*\.)?(?:layers|h|blocks|block|layer))\.(\d+)\.")


def _place(tensor: torch.Tensor, where: tuple | None) -> torch.Tensor:
    """The checkpoint tensor at `where` (size, stride, offset) inside a contiguous module tensor."""
    if where is None:
        return tensor
    size, stride, offset = where
    tensor = tensor.contiguous()
    return tensor.as_strided(size, stride, tensor.storage_offset() + offset)


def path_state_dict(path: LayerPath, sources: Mapping[str, nn.Module]) -> PathStateDict:
    """Exactly the tensors `export_path` writes, by checkpoint name (lazy: folded on access)."""
    return PathStateDict(path, sources)


def path_hash(path: LayerPath, sources: Mapping[str, nn.Module]) -> str:
    """The weights hash of a path's exported checkpoint, computed in memory."""
    return weights_hash(path_state_dict(path, sources))


def _slices(path: LayerPath, folds: Sequence[LayerFold | None]) -> list[tuple[str, int, int, float, LayerFold | None]]:
    """(model, first layer, end layer, fold factor, fold) per run of consecutive layers of one model with one factor."""
    runs: list[tuple[str, int, int, float, LayerFold | None]] = []
    for step, factor, fold in zip(path.steps, path.fold_factors(), folds):
        last = runs[-1] if runs else None
        if last is not None and (last[0], last[2], last[3]) == (step.model, step.layer, factor):
            runs[-1] = (last[0], last[1], step.layer + 1, factor, last[4] or fold)
        else:
            runs.append((step.model, step.layer, step.layer + 1, factor, fold))
    return runs


def _scale_filters(fold: LayerFold | None) -> tuple[str, ...]:
    """The mergekit `scale` filters of a fold: its modules' paths in the layer (a filter matches by substring)."""
    scaled = fold.scaled if fold is not None else {"self_attn.o_proj.weight", "mlp.down_proj.weight"}
    modules = {suffix if suffix in RESIDUAL_WRITERS else suffix.rsplit(".", 1)[0] for suffix in scaled}
    return tuple(sorted(modules, key=lambda name: ("attn" not in name and "attention" not in name, name)))


def path_recipe(
    path: LayerPath,
    *,
    dtype: str,
    folds: Sequence[LayerFold | None] | None = None,
    refs: Mapping[str, str] | None = None,
    notes: Sequence[str] = (),
) -> str:
    """The path as a mergekit `passthrough` YAML: one slice per run, each fold as a `scale` on its tensors.

    `folds` (PathStateDict.folds: the rule per step) picks the filters; without it a scaled step is
    taken to be pre-norm (o_proj, down_proj). A fold mergekit's `scale` cannot write (a 1 + w norm
    gain) is left out of the recipe and named in its header. `refs` maps a model name to how the
    recipe names it (default: the name); `notes` are extra header lines.
    """
    from evomerge.config.mergekit_yaml import dump_yaml

    folds = list(folds) if folds is not None else [None] * len(path.steps)
    refs = refs or {}
    slices, unwritable = [], []
    for model, start, end, factor, fold in _slices(path, folds):
        source: dict = {"model": refs.get(model, model), "layer_range": [start, end]}
        if factor != 1.0 and fold is not None and fold.offset != 0.0:
            unwritable.append(f"{model} {start}-{end - 1}")
        elif factor != 1.0:
            scales = [{"filter": name, "value": factor} for name in _scale_filters(fold)]
            source["parameters"] = {"scale": [*scales, {"value": 1.0}]}
        slices.append({"sources": [source]})
    header = [
        "# Made by evomerge from a layer path (data-flow search). Run with mergekit-yaml or evomerge merge.",
        "# The step scales are folded into each layer's output projections or output norms as `scale`.",
        *(f"# {note}" for note in notes),
    ]
    if unwritable:
        header.append(
            f"# Note: the scales of {', '.join(unwritable)} fold into norms whose gain is 1 + w, which a passthrough "
            "`scale` cannot express: this recipe leaves them out (the exported checkpoint has them)."
        )
    if path.embed_from != path.steps[0].model or path.head_from != path.steps[-1].model:
        header.append(
            f"# Note: the path takes embeddings from {path.embed_from} and the head from {path.head_from}; "
            "passthrough takes them from the first and last slice's model, so this recipe differs there."
        )
    return "\n".join(header) + "\n" + dump_yaml({"merge_method": "passthrough", "slices": slices, "dtype": dtype})


def export_path(
    path: LayerPath,
    sources: Mapping[str, nn.Module],
    out_dir: Path,
    *,
    tokenizer_dir: Path | None = None,
    expected_hash: str | None = None,
) -> str:
    """Write the path as a checkpoint `AutoModelForCausalLM.from_pretrained` loads; returns its weights hash.

    `tokenizer_dir` (default: `embed_from`'s folder) gives the tokenizer and generation files.
    With `expected_hash` (the hash recorded for the scored candidate) a mismatch is an error.
    """
    from evomerge.dtypes import dtype_name
    from evomerge.io.checkpoint import copy_tokenizer, relocate_recipe, write_recipe
    from evomerge.io.safetensors_io import StreamingCheckpointWriter

    out_dir = Path(out_dir)
    tensors = path_state_dict(path, sources)
    layout = [(name, tuple(tensors.source_tensor(name).shape), tensors.source_tensor(name).dtype) for name in tensors]
    with StreamingCheckpointWriter(out_dir, layout, metadata={"evomerge_path": path.text()}) as writer:
        for name in tensors:
            writer.write(name, tensors[name])
    config = path_config(path, sources)
    config.save_pretrained(out_dir)
    donor = Path(tokenizer_dir) if tokenizer_dir is not None else Path(sources[path.embed_from].name_or_path)
    if donor.is_dir():
        copy_tokenizer(donor, out_dir)
    dtype = dtype_name(next(iter(layout))[2])
    folders = {name: Path(sources[name].name_or_path) for name in path.models}
    recipe = path_recipe(path, dtype=dtype, folds=tensors.folds)
    if all(folder.is_dir() for folder in folders.values()):
        recipe = relocate_recipe(recipe, final_dir=out_dir, paths=folders)
    write_recipe(out_dir, recipe)
    written = checkpoint_hash(out_dir)
    if expected_hash is not None and written != expected_hash:
        raise ValueError(
            f"{out_dir}: exported weights hash {written} differs from the scored candidate's {expected_hash}"
        )
    return written
