"""A path model in memory: a model of the sources' class whose layers are the sources' own modules.

Nothing is copied. The path model is built on the meta device (its own weights take no memory),
then its decoder-layer list is replaced by thin `ScaledStep` wrappers around the resident source
layers (the same module may sit at several steps), and its embeddings, rotary tables, final norm
and lm_head by the sources' modules. A candidate therefore costs the resident sources plus
activations, and building one takes milliseconds.

What a repeated layer breaks, and how it is handled:
- The KV cache: attention calls `past_key_values.update(k, v, self.layer_idx)`, and a shared
  module has one `layer_idx`. Each step sets the index of every indexed submodule of its layer to
  the step's position for the duration of its call (restored afterwards), so every cache access
  the layer makes (update, lengths, per-layer cache types) lands on the step's own cache slot.
  Consequence: the sources must not run forward in another thread at the same time.
- Rotary embeddings are computed once per forward at the model level (Llama, Mistral, Qwen), from
  `embed_from`'s rotary module; validation guarantees every source has the same rope settings.
- Per-layer attributes the model level reads: `config.layer_types` (mask and cache type per
  layer) is rebuilt per step from each step's source; other attributes are read through the
  wrapper from the wrapped layer.
Because every module is shared, moving or casting a path model (`.to`, `.half`) moves its sources:
place the sources once with `load_sources(device=, dtype=)` instead.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from evomerge.dataflow.path import LayerPath

# Config fields that must agree for layers to be chained (and for the export's single config to
# describe every layer): the residual stream's width, the attention shape, the rotary settings, and
# what a standard checkpoint stores once for all layers.
CHAIN_FIELDS = (
    "model_type",
    "hidden_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rope_parameters",
    "rope_theta",
    "rope_scaling",
    "partial_rotary_factor",
    "intermediate_size",
    "hidden_act",
    "attention_bias",
    "mlp_bias",
    "rms_norm_eps",
    "vocab_size",
    "tie_word_embeddings",
)

# Children of the inner model that belong to the head (the final norm); every other non-layer child
# (embeddings, rotary tables) comes from `embed_from`.
_HEAD_CHILDREN = frozenset({"norm", "final_layernorm", "final_layer_norm", "ln_f"})
_LAYER_LISTS = ("layers", "h", "blocks", "block", "layer")


def load_sources(
    paths: Mapping[str, Path], *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> dict[str, nn.Module]:
    """Each source loaded once from its safetensors folder, in eval mode (the resident pool)."""
    from transformers import AutoModelForCausalLM

    sources = {}
    for name, path in paths.items():
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=dtype, trust_remote_code=False, use_safetensors=True
        )
        sources[name] = model.to(device).eval()
    return sources


def _config_value(config: Any, field: str) -> Any:
    if field == "head_dim":
        value = getattr(config, "head_dim", None)
        return value if value is not None else config.hidden_size // config.num_attention_heads
    return getattr(config, field, None)


def check_chainable(sources: Mapping[str, nn.Module]) -> None:
    """One ValueError naming the models and the fields when the sources' layers cannot be chained."""
    names = list(sources)
    first = names[0]
    first_dtype = next(sources[first].parameters()).dtype
    for other in names[1:]:
        differences = []
        for field in CHAIN_FIELDS:
            mine, theirs = _config_value(sources[first].config, field), _config_value(sources[other].config, field)
            if mine != theirs:
                differences.append(f"{field} ({first}: {mine!r}, {other}: {theirs!r})")
        other_dtype = next(sources[other].parameters()).dtype
        if other_dtype != first_dtype:
            differences.append(f"dtype ({first}: {first_dtype}, {other}: {other_dtype})")
        if differences:
            raise ValueError(
                f"models {first!r} and {other!r} cannot be chained in one layer path: {'; '.join(differences)} differ"
            )


def layer_container(model: nn.Module) -> tuple[str, nn.Module, str]:
    """(path in the base model, module, child name) of the module holding the decoder-layer list:
    the base model itself in most models (`model.layers`), its `decoder` in OPT."""
    for path, module in model.base_model.named_modules():
        if path.count(".") > 1:
            continue
        for name in _LAYER_LISTS:
            if isinstance(getattr(module, name, None), nn.ModuleList):
                return path, module, name
    raise ValueError(f"{type(model).__name__}: no decoder-layer list found (looked for {', '.join(_LAYER_LISTS)})")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder-layer list of a causal LM (`model.layers` in Llama-style models)."""
    _, container, name = layer_container(model)
    return getattr(container, name)


def check_path(path: LayerPath, sources: Mapping[str, nn.Module]) -> None:
    """The path's models exist, its layers are in range, and its sources can be chained."""
    missing = [name for name in path.models if name not in sources]
    if missing:
        raise ValueError(f"layer path names unknown models {missing}; loaded: {sorted(sources)}")
    for index, step in enumerate(path.steps):
        count = len(decoder_layers(sources[step.model]))
        if step.layer >= count:
            raise ValueError(f"layer path step {index}: {step.model} has {count} layers, no layer {step.layer}")
    check_chainable({name: sources[name] for name in path.models})
    if sources[path.embed_from].config.tie_word_embeddings and path.embed_from != path.head_from:
        raise ValueError(
            f"tied embeddings: the head is the embedding matrix, so embed_from ({path.embed_from}) "
            f"and head_from ({path.head_from}) must be the same model"
        )


def path_config(path: LayerPath, sources: Mapping[str, nn.Module]) -> Any:
    """`embed_from`'s config with one layer per step (and each step's layer type where the model has them)."""
    config = copy.deepcopy(sources[path.embed_from].config)
    config.num_hidden_layers = len(path.steps)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [sources[step.model].config.layer_types[step.layer] for step in path.steps]
    return config


class ScaledStep(nn.Module):
    """One path step: scales the hidden state entering a (shared) source layer and runs that layer
    with its cache index set to the step's position."""

    def __init__(self, layer: nn.Module, *, step: int, scale: float):
        super().__init__()
        self.layer = layer
        self.step = step
        self.scale = scale
        # Every submodule whose `layer_idx` addresses the cache (the attention, sometimes the layer).
        self._indexed = [module for module in layer.modules() if isinstance(getattr(module, "layer_idx", None), int)]

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if self.scale != 1.0:
            hidden_states = hidden_states * self.scale
        saved = [module.layer_idx for module in self._indexed]
        for module in self._indexed:
            module.layer_idx = self.step
        try:
            return self.layer(hidden_states, *args, **kwargs)
        finally:
            for module, index in zip(self._indexed, saved):
                module.layer_idx = index

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_") or name == "layer":
                raise
            return getattr(self._modules["layer"], name)

    def extra_repr(self) -> str:
        return f"step={self.step}, scale={self.scale!r}"


def build_path_model(path: LayerPath, sources: Mapping[str, nn.Module]) -> nn.Module:
    """The path model: of `embed_from`'s class, every weight a reference to a resident source's."""
    from transformers import AutoModelForCausalLM

    check_path(path, sources)
    embed_source, head_source = sources[path.embed_from], sources[path.head_from]
    devices = {next(sources[name].parameters()).device for name in path.models}
    if len(devices) > 1:
        raise ValueError(f"layer path sources sit on several devices ({sorted(map(str, devices))}); load them on one")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            path_config(path, sources), attn_implementation=embed_source.config._attn_implementation
        )
    where, inner, layer_list = layer_container(model)
    embed_inner, head_inner = (source.base_model.get_submodule(where) for source in (embed_source, head_source))
    for name, _ in list(inner.named_children()):
        if name == layer_list:
            steps = [
                ScaledStep(decoder_layers(sources[step.model])[step.layer], step=index, scale=step.scale)
                for index, step in enumerate(path.steps)
            ]
            setattr(inner, name, nn.ModuleList(steps))
        else:
            setattr(inner, name, getattr(head_inner if name in _HEAD_CHILDREN else embed_inner, name))
    outer = [(model, head_source, model.base_model_prefix)]  # the head; and OPT's decoder beside its base model
    if where:
        outer.append((model.base_model, embed_source.base_model, where))
    for module, source, kept in outer:
        for name, _ in list(module.named_children()):
            if name != kept:
                setattr(module, name, getattr(source, name))
    left_on_meta = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if left_on_meta:
        raise ValueError(f"{type(model).__name__}: path model has tensors no source provides: {left_on_meta[:5]}")
    model.generation_config = copy.deepcopy(embed_source.generation_config)
    return model.eval()
