"""Which group a tensor's statistics go to: its layer group (as a genome groups layers) and its kind."""

from __future__ import annotations

import math
import re

from evomerge.merge.layout import LayerLayout

EMBEDDINGS = "embeddings"
HEAD = "head"
DEFAULT_GROUPS = 4  # layer groups when neither the space nor --group-size says

# (kind, pattern on the tensor name), first match wins; covers Llama/Mistral/Qwen/Gemma, GPT-2, NeoX, Falcon, Phi.
_KINDS = (
    ("embed", re.compile(r"embed_tokens|\bwte\b|\bwpe\b|word_embeddings|embed_in")),
    ("head", re.compile(r"lm_head|embed_out")),
    ("norm", re.compile(r"norm|\bln_|_ln\b|layernorm")),
    ("attn.qkv", re.compile(r"qkv|c_attn|query_key_value|Wqkv")),
    ("attn.q", re.compile(r"q_proj|\bquery\b|\bq\b")),
    ("attn.k", re.compile(r"k_proj|\bkey\b|\bk\b")),
    ("attn.v", re.compile(r"v_proj|\bvalue\b|\bv\b")),
    ("attn.o", re.compile(r"o_proj|out_proj|attn\.c_proj|attention\.dense|self_attention\.dense|attn\.dense")),
    ("mlp", re.compile(r"mlp|gate_proj|up_proj|down_proj|\bfc\d?\b|dense_h_to_4h|dense_4h_to_h|experts|ffn")),
)
KIND_ORDER = tuple(kind for kind, _ in _KINDS) + ("other",)


def tensor_kind(name: str) -> str:
    """attn.q / attn.k / attn.v / attn.o / attn.qkv (fused), mlp, norm, embed, head, or other."""
    for kind, pattern in _KINDS:
        if pattern.search(name):
            return kind
    return "other"


def default_group_size(num_layers: int) -> int:
    """Layers per group for about DEFAULT_GROUPS equal groups: the smallest divisor of the layer
    count at or above count / DEFAULT_GROUPS (a genome's layer_granularity must divide it)."""
    if num_layers <= 0:
        return 1
    wanted = math.ceil(num_layers / DEFAULT_GROUPS)
    return next(size for size in range(wanted, num_layers + 1) if num_layers % size == 0)


def layer_group_names(layout: LayerLayout, group_size: int) -> dict[str, str]:
    """Tensor name -> its group: `embeddings`, `layers a-b` (group_size layers each, the last may
    be shorter) or `head` (everything after the layers: final norm, lm_head)."""
    groups = {name: EMBEDDINGS for name in layout.pre}
    for index, suffixes in layout.layers.items():
        first = index - index % group_size
        last = min(first + group_size, layout.num_layers) - 1
        label = f"layer {first}" if first == last else f"layers {first}-{last}"
        for suffix in suffixes:
            groups[layout.layer_tensor(index, suffix)] = label
    groups.update({name: HEAD for name in layout.post})
    return groups
