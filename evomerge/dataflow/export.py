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

This needs the layer to be pre-norm with nothing between o_proj/down_proj and the residual add
(Llama, Mistral, Qwen2/3: children self_attn, mlp, input_layernorm, post_attention_layernorm).
A layer with post-norms (Gemma 2/3) is refused when its factor is not 1.

`path_state_dict` is the one description of the exported tensors: export writes it and the
search hashes it, so the hash recorded for a scored candidate is the exported checkpoint's.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from torch import nn

from evomerge.dataflow.path import LayerPath
from evomerge.dataflow.path_model import check_path, path_config
from evomerge.io.hashing import checkpoint_hash, weights_hash
from evomerge.merge.layout import LayerLayout, split_layers

# The output projections of a pre-norm layer's two sub-blocks: the tensors a fold factor scales.
FOLDED_SUFFIXES = frozenset(
    {"self_attn.o_proj.weight", "self_attn.o_proj.bias", "mlp.down_proj.weight", "mlp.down_proj.bias"}
)
_PRE_NORM_CHILDREN = frozenset({"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"})


def _saved_names(model: nn.Module) -> list[str]:
    """The tensor names `save_pretrained` writes (tied copies left out)."""
    names = list(model.state_dict())
    if model.config.tie_word_embeddings:
        tied = getattr(model, "_tied_weights_keys", None) or ()
        names = [name for name in names if name not in set(tied)]
    return names


def _check_foldable(source: str, layer: int, suffixes: tuple[str, ...]) -> None:
    children = {suffix.split(".", 1)[0] for suffix in suffixes}
    if not children <= _PRE_NORM_CHILDREN or not {"self_attn.o_proj.weight", "mlp.down_proj.weight"} <= set(suffixes):
        raise ValueError(
            f"{source} layer {layer}: its step scale cannot be folded into the weights (the fold needs a pre-norm "
            f"layer of {sorted(_PRE_NORM_CHILDREN)} ending in o_proj and down_proj; it has {sorted(children)})"
        )


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
        # output name -> (source model, source tensor name, fold factor)
        self._origin: dict[str, tuple[str, str, float]] = {}
        for name in layouts[path.embed_from].pre:
            self._origin[name] = (path.embed_from, name, 1.0)
        prefix = layouts[path.embed_from].prefix
        for index, (step, factor) in enumerate(zip(path.steps, factors)):
            layout = layouts[step.model]
            suffixes = layout.layers[step.layer]
            if factor != 1.0:
                _check_foldable(step.model, step.layer, suffixes)
            for suffix in suffixes:
                folded = factor if suffix in FOLDED_SUFFIXES else 1.0
                self._origin[f"{prefix}.{index}.{suffix}"] = (
                    step.model,
                    layout.layer_tensor(step.layer, suffix),
                    folded,
                )
        for name in layouts[path.head_from].post:
            self._origin[name] = (path.head_from, name, 1.0)

    def source_tensor(self, name: str) -> torch.Tensor:
        """The unfolded source tensor behind `name` (its shape and dtype are the output's)."""
        model, source_name, _ = self._origin[name]
        return self._states[model][source_name].detach()

    def __getitem__(self, name: str) -> torch.Tensor:
        tensor = self.source_tensor(name)
        factor = self._origin[name][2]
        if factor == 1.0:
            return tensor
        return (tensor.to(torch.float32) * factor).to(tensor.dtype)

    def __iter__(self) -> Iterator[str]:
        return iter(self._origin)

    def __len__(self) -> int:
        return len(self._origin)


def path_state_dict(path: LayerPath, sources: Mapping[str, nn.Module]) -> PathStateDict:
    """Exactly the tensors `export_path` writes, by checkpoint name (lazy: folded on access)."""
    return PathStateDict(path, sources)


def path_hash(path: LayerPath, sources: Mapping[str, nn.Module]) -> str:
    """The weights hash of a path's exported checkpoint, computed in memory."""
    return weights_hash(path_state_dict(path, sources))


def _slices(path: LayerPath) -> list[tuple[str, int, int, float]]:
    """(model, first layer, end layer, fold factor) per run of consecutive layers of one model with one factor."""
    runs: list[tuple[str, int, int, float]] = []
    for step, factor in zip(path.steps, path.fold_factors()):
        if runs and runs[-1][0] == step.model and runs[-1][2] == step.layer and runs[-1][3] == factor:
            model, start, _, _ = runs[-1]
            runs[-1] = (model, start, step.layer + 1, factor)
        else:
            runs.append((step.model, step.layer, step.layer + 1, factor))
    return runs


def path_recipe(path: LayerPath, *, dtype: str) -> str:
    """The path as a mergekit `passthrough` YAML: one slice per run, the fold as `scale` on o_proj/down_proj."""
    from evomerge.config.mergekit_yaml import dump_yaml

    slices = []
    for model, start, end, factor in _slices(path):
        source: dict = {"model": model, "layer_range": [start, end]}
        if factor != 1.0:
            source["parameters"] = {
                "scale": [
                    {"filter": "o_proj", "value": factor},
                    {"filter": "down_proj", "value": factor},
                    {"value": 1.0},
                ]
            }
        slices.append({"sources": [source]})
    header = (
        "# Made by evomerge from a layer path (data-flow search). Run with mergekit-yaml or evomerge merge.\n"
        "# The step scales are folded into o_proj and down_proj as `scale` (exact for pre-norm layers).\n"
    )
    if path.embed_from != path.steps[0].model or path.head_from != path.steps[-1].model:
        header += (
            f"# Note: the path takes embeddings from {path.embed_from} and the head from {path.head_from}; "
            "passthrough takes them from the first and last slice's model, so this recipe differs there.\n"
        )
    return header + dump_yaml({"merge_method": "passthrough", "slices": slices, "dtype": dtype})


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
    recipe = path_recipe(path, dtype=dtype)
    if all(folder.is_dir() for folder in folders.values()):
        recipe = relocate_recipe(recipe, final_dir=out_dir, paths=folders)
    write_recipe(out_dir, recipe)
    written = checkpoint_hash(out_dir)
    if expected_hash is not None and written != expected_hash:
        raise ValueError(
            f"{out_dir}: exported weights hash {written} differs from the scored candidate's {expected_hash}"
        )
    return written
