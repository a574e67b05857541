"""Where a decoder checkpoint keeps its layers: which tensors are per layer, before, after.

mergekit ships per-architecture JSON files for this; for the decoder-only family we target
(Llama, Mistral, Qwen, Gemma, GPT-2/NeoX style) one naming rule covers them all: per-layer
tensors are `<prefix>.<index>.<suffix>` under a `layers`/`h`/`blocks` container. Embeddings
come before the layers, everything else (final norm, lm_head) after.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from evomerge.errors import CompatibilityError

_LAYER_RE = re.compile(r"^(?P<prefix>(?:.*\.)?(?:layers|h|blocks|block|layer))\.(?P<index>\d+)\.(?P<suffix>.+)$")
_PRE_HINTS = ("embed", "wte", "wpe", "word_embeddings")


@dataclass(frozen=True)
class LayerLayout:
    prefix: str | None  # e.g. "model.layers"; None when the model has no layer stack
    layers: dict[int, tuple[str, ...]]  # layer index -> tensor suffixes, sorted
    pre: tuple[str, ...]  # non-layer tensors that come before the layers (embeddings)
    post: tuple[str, ...]  # non-layer tensors after the layers (final norm, lm_head)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def layer_tensor(self, index: int, suffix: str) -> str:
        return f"{self.prefix}.{index}.{suffix}"


def split_layers(tensor_names: Iterable[str], *, source: str = "model") -> LayerLayout:
    layers: dict[int, list[str]] = {}
    prefixes: set[str] = set()
    pre, post = [], []
    for name in tensor_names:
        match = _LAYER_RE.match(name)
        if match:
            prefixes.add(match.group("prefix"))
            layers.setdefault(int(match.group("index")), []).append(match.group("suffix"))
        elif any(hint in name for hint in _PRE_HINTS):
            pre.append(name)
        else:
            post.append(name)
    if len(prefixes) > 1:
        raise CompatibilityError(
            f"{source}: several layer stacks ({', '.join(sorted(prefixes))}); only decoder-only models are supported"
        )
    if layers and sorted(layers) != list(range(len(layers))):
        raise CompatibilityError(f"{source}: layer indices are not contiguous from 0: {sorted(layers)[:8]}...")
    return LayerLayout(
        prefix=next(iter(prefixes), None),
        layers={index: tuple(sorted(suffixes)) for index, suffixes in sorted(layers.items())},
        pre=tuple(sorted(pre)),
        post=tuple(sorted(post)),
    )
