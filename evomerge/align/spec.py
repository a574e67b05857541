"""Which tensor axes each permutation of a Llama-style model acts on (Git Re-Basin's symmetries).

A decoder block computes the same function when its hidden units are reordered consistently:
- `residual`: one permutation of the residual stream's channels, shared by every layer (the
  embedding's columns, every q/k/v/gate/up input, every o/down output, every RMSNorm weight and
  the lm_head's columns; RMSNorm divides by the root mean square over channels, which no
  reordering changes, so permuting its weight with the channels keeps it exact);
- `mlp.L`: the MLP hidden units of layer L (gate/up outputs, down inputs);
- `heads.L`: whole attention heads of layer L. Only whole heads move: RoPE rotates fixed pairs of
  dimensions inside a head, so a reordering inside a head would change the function. With grouped
  query attention a key/value head is shared by `group` query heads, so a head permutation moves
  key/value groups and may reorder the query heads within a group (`Axis.kind` "kv_heads" reads
  the group order off the query-head permutation).

Phi-3 fuses q/k/v into `qkv_proj` and gate/up into `gate_up_proj` (stacked along the output
axis): such a tensor is matched and permuted as its parts (`PermutationSpec.fused`).

Architectures whose permutation structure is not written here are refused with one line.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from evomerge.errors import CompatibilityError

# Architectures with Llama's block: pre-norm RMSNorm, RoPE attention (GQA allowed), gated MLP.
# Qwen2 adds q/k/v biases (permuted with their outputs); Qwen3 and Gemma 3 add q_norm/k_norm over
# head_dim, shared by every head and so untouched by a head permutation. Gemma's norms scale by
# (1 + w) and its embedding by sqrt(hidden): still per channel, and a scalar. Gemma 2 and 3 add
# norms on each sub-block's output and before the MLP, all over residual channels. Phi-3 is
# Llama's block with fused projections.
SUPPORTED = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "GemmaForCausalLM",
    "Gemma2ForCausalLM",
    "Gemma3ForCausalLM",
    "Phi3ForCausalLM",
)

AxisKind = Literal["plain", "q_heads", "kv_heads"]


@dataclass(frozen=True)
class Axis:
    """One tensor axis a permutation acts on: units of 1 (plain) or whole heads of `head_dim`."""

    perm: str
    kind: AxisKind = "plain"


@dataclass(frozen=True)
class PermutationSpec:
    """Every permutation (name -> number of units it reorders) and, per tensor, what acts on each
    axis. A fused tensor is not in `axes`: its parts are, named in `fused`."""

    architecture: str
    sizes: Mapping[str, int]  # heads.L counts query heads
    axes: Mapping[str, tuple[Axis | None, ...]]
    head_dim: int
    group: int  # query heads per key/value head
    fused: Mapping[str, tuple[tuple[str, int], ...]] = field(default_factory=dict)  # tensor -> (part, rows) along dim 0

    def perms_of(self, tensor: str) -> tuple[str, ...]:
        parts = [name for name, _ in self.fused[tensor]] if tensor in self.fused else [tensor]
        return tuple(axis.perm for part in parts for axis in self.axes[part] if axis is not None)


_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")


def _layer_axes(rest: str, layer: int) -> tuple[Axis | None, ...] | None:
    """Axes of one tensor inside block `layer` (`rest` is its name after `model.layers.L.`)."""
    residual, mlp, heads = Axis("residual"), Axis(f"mlp.{layer}"), f"heads.{layer}"
    q_heads, kv_heads = Axis(heads, "q_heads"), Axis(heads, "kv_heads")
    table: dict[str, tuple[Axis | None, ...]] = {
        "input_layernorm.weight": (residual,),
        "post_attention_layernorm.weight": (residual,),
        "pre_feedforward_layernorm.weight": (residual,),
        "post_feedforward_layernorm.weight": (residual,),
        "self_attn.q_proj.weight": (q_heads, residual),
        "self_attn.q_proj.bias": (q_heads,),
        "self_attn.k_proj.weight": (kv_heads, residual),
        "self_attn.k_proj.bias": (kv_heads,),
        "self_attn.v_proj.weight": (kv_heads, residual),
        "self_attn.v_proj.bias": (kv_heads,),
        "self_attn.o_proj.weight": (residual, q_heads),
        "self_attn.o_proj.bias": (residual,),
        "self_attn.q_norm.weight": (None,),
        "self_attn.k_norm.weight": (None,),
        "self_attn.rotary_emb.inv_freq": (None,),
        "mlp.gate_proj.weight": (mlp, residual),
        "mlp.gate_proj.bias": (mlp,),
        "mlp.up_proj.weight": (mlp, residual),
        "mlp.up_proj.bias": (mlp,),
        "mlp.down_proj.weight": (residual, mlp),
        "mlp.down_proj.bias": (residual,),
    }
    return table.get(rest)


# Fused tensors: their parts in order along the output axis (named as the unfused tensors).
_FUSED = {
    "self_attn.qkv_proj.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "self_attn.qkv_proj.bias": ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
    "mlp.gate_up_proj.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    "mlp.gate_up_proj.bias": ("mlp.gate_proj.bias", "mlp.up_proj.bias"),
}


def _part_name(tensor: str, part: str) -> str:
    return f"{tensor}[{part.split('.')[-2]}]"  # model.layers.0.self_attn.qkv_proj.weight[q_proj]


_TOP_LEVEL: dict[str, tuple[Axis | None, ...]] = {
    "model.embed_tokens.weight": (None, Axis("residual")),
    "model.norm.weight": (Axis("residual"),),
    "lm_head.weight": (None, Axis("residual")),
}


def _config_int(config: Mapping, key: str, default: int | None = None) -> int:
    value = config.get(key, default)
    if type(value) is not int or value <= 0:
        raise CompatibilityError(f"config.json: {key}: expected a positive whole number, got {value!r}")
    return value


def permutation_spec(
    architecture: str, config: Mapping, shapes: Mapping[str, tuple[int, ...]], *, where: str = "model"
) -> PermutationSpec:
    """The permutation structure of a checkpoint, from its architecture, config and tensor shapes.

    Refuses (CompatibilityError, one line) an architecture not in SUPPORTED, a tensor this
    structure does not cover, and a shape that disagrees with the config."""
    if architecture not in SUPPORTED:
        raise CompatibilityError(
            f"{where}: architecture {architecture} has no known permutation structure for alignment; "
            f"supported: {', '.join(SUPPORTED)}"
        )
    hidden = _config_int(config, "hidden_size")
    heads = _config_int(config, "num_attention_heads")
    kv_heads = _config_int(config, "num_key_value_heads", heads)
    head_dim = _config_int(config, "head_dim") if config.get("head_dim") is not None else hidden // heads
    intermediate = _config_int(config, "intermediate_size")
    if heads % kv_heads:
        raise CompatibilityError(
            f"{where}: config.json: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
        )
    sizes = {"residual": hidden}
    unit_sizes = {"residual": hidden}  # length of the axis each perm acts on, to check shapes
    axes: dict[str, tuple[Axis | None, ...]] = {}
    fused: dict[str, tuple[tuple[str, int], ...]] = {}

    def length_of(axis: Axis) -> int:
        if axis.kind == "plain":
            return unit_sizes[axis.perm]
        return (heads if axis.kind == "q_heads" else kv_heads) * head_dim

    for name, shape in shapes.items():
        match = _LAYER.fullmatch(name)
        found = _layer_axes(match[2], int(match[1])) if match else _TOP_LEVEL.get(name)
        parts = _FUSED.get(match[2]) if match and found is None else None
        if parts is not None:
            part_axes = [_layer_axes(part, int(match[1])) for part in parts]
            found = part_axes[0]
        if found is None or len(found) != len(shape):
            raise CompatibilityError(
                f"{where}: tensor {name} {tuple(shape)} is not part of the {architecture} permutation structure; "
                f"alignment supports plain {', '.join(SUPPORTED)} checkpoints"
            )
        if match:
            layer = int(match[1])
            sizes[f"mlp.{layer}"] = intermediate
            sizes[f"heads.{layer}"] = heads
            unit_sizes[f"mlp.{layer}"] = intermediate
        if parts is not None:
            rows = [length_of(axes_of_part[0]) for axes_of_part in part_axes]
            if shape[0] != sum(rows):
                raise CompatibilityError(
                    f"{where}: tensor {name} has shape {tuple(shape)}, but config.json's sizes give {sum(rows)} "
                    f"rows for its {len(parts)} fused parts"
                )
            fused[name] = tuple((_part_name(name, part), count) for part, count in zip(parts, rows))
            for (part, count), axes_of_part in zip(fused[name], part_axes):
                _check_lengths(where, part, (count, *shape[1:]), axes_of_part, length_of)
                axes[part] = axes_of_part
            continue
        _check_lengths(where, name, shape, found, length_of)
        axes[name] = found
    return PermutationSpec(architecture, sizes, axes, head_dim, heads // kv_heads, fused)


def _check_lengths(where: str, name: str, shape: tuple[int, ...], found: tuple[Axis | None, ...], length_of) -> None:
    for axis, length in zip(found, shape):
        if axis is not None and length != length_of(axis):
            raise CompatibilityError(
                f"{where}: tensor {name} has shape {tuple(shape)}, but config.json's sizes give {length_of(axis)} "
                f"along the axis of {axis.perm}"
            )
