"""Where a decoder checkpoint keeps its layers: which tensors are per layer, before, after.

mergekit ships per-architecture JSON files for this; for the decoder-only family we target
(Llama, Mistral, Qwen, Gemma, GPT-2/NeoX style) one naming rule covers the layers: per-layer
tensors are `<prefix>.<index>.<suffix>` under a `layers`/`h`/`blocks` container. Which of the
others are embeddings (before the layers) and which the final norm and head (after) is read from
the model's own structure (structure.py); name hints remain only for a model transformers cannot
build.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from evomerge.errors import CompatibilityError

if TYPE_CHECKING:
    from evomerge.io.model_dir import ModelDir

_LAYER_RE = re.compile(r"^(?P<prefix>(?:.*\.)?(?:layers|h|blocks|block|layer))\.(?P<index>\d+)\.(?P<suffix>.+)$")
_PRE_HINTS = ("embed", "wte", "wpe", "word_embeddings")  # only for a model without a known structure


@dataclass(frozen=True)
class LayerLayout:
    prefix: str | None  # e.g. "model.layers"; None when the model has no layer stack
    layers: dict[int, tuple[str, ...]]  # layer index -> tensor suffixes, sorted
    pre: tuple[str, ...]  # non-layer tensors that come before the layers (embeddings)
    post: tuple[str, ...]  # non-layer tensors after the layers (final norm, lm_head)
    input_embedding: str | None = None  # the token embedding (what a tied head reads), when known

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def layer_tensor(self, index: int, suffix: str) -> str:
        return f"{self.prefix}.{index}.{suffix}"


def model_layout(model: ModelDir) -> LayerLayout:
    """The layout of a checkpoint folder, its embeddings known from its config's model class."""
    from evomerge.merge.structure import config_roles

    roles = config_roles(model.config)
    return split_layers(
        model.tensors,
        source=str(model.path),
        embeddings=roles.embeddings if roles else None,
        input_embedding=roles.input_embedding if roles else None,
    )


def split_layers(
    tensor_names: Iterable[str],
    *,
    source: str = "model",
    embeddings: Collection[str] | None = None,
    input_embedding: str | None = None,
) -> LayerLayout:
    """Layers by index, the input-side tensors (`embeddings`: names; None: guessed from names)
    before them and every other tensor after them."""
    layers: dict[int, list[str]] = {}
    prefixes: set[str] = set()
    pre, post = [], []
    for name in tensor_names:
        match = _LAYER_RE.match(name)
        if match:
            prefixes.add(match.group("prefix"))
            layers.setdefault(int(match.group("index")), []).append(match.group("suffix"))
        elif name in embeddings if embeddings is not None else any(hint in name for hint in _PRE_HINTS):
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
        input_embedding=input_embedding if input_embedding in pre else None,
    )
