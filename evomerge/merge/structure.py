"""Which checkpoint tensors are embeddings and which the output head, read from the model itself.

Names do not say it: GPT-NeoX's output head is `embed_out`, GPT-2's position table `wpe`, OPT's
`embed_positions`. The model class does: transformers builds it (on the meta device, so nothing
is allocated), `get_input_embeddings` / `get_output_embeddings` name the token tables, every other
`nn.Embedding` is a position or type table, and transformers' own save-time renaming turns
module names into the checkpoint's names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from evomerge.io.model_dir import ModelDir


@dataclass(frozen=True)
class Roles:
    embeddings: frozenset[str]  # checkpoint names of the input-side tables (token, position, type)
    input_embedding: str | None  # the token embedding's weight
    output_embedding: str | None  # the output head's weight (the input embedding's when tied)


def module_roles(model: nn.Module) -> Roles:
    """The roles of a built (or loaded) model's tensors, by checkpoint name."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    token = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tables = [
        name
        for module_name, module in model.named_modules()
        if (isinstance(module, nn.Embedding) or module is token) and module is not head
        for name in _tensor_names(module_name, module)
    ]
    input_name = _weight_name(model, token)
    output_name = _weight_name(model, head)
    if head is not None and token is not None and head.weight is token.weight:
        output_name = input_name  # tied: the checkpoint keeps the input table only
    extra = [name for name in (input_name, output_name) if name is not None]
    names = checkpoint_names(model, [*tables, *extra])
    return Roles(
        embeddings=frozenset(names[name] for name in tables),
        input_embedding=names.get(input_name) if input_name else None,
        output_embedding=names.get(output_name) if output_name else None,
    )


def checkpoint_names(model: nn.Module, module_names: list[str]) -> dict[str, str]:
    """Module tensor name -> the name transformers writes it under (its renaming on save)."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:
        return {name: name for name in module_names}
    renamed = {}
    for name in module_names:
        probe = {name: torch.empty(0, device="meta")}
        try:
            reverted = revert_weight_conversion(model, probe) if hasattr(model, "config") else probe
        except Exception:  # a fused tensor: not an embedding or head, keep the module's name
            reverted = probe
        renamed[name] = next(iter(reverted)) if len(reverted) == 1 else name
    return renamed


def _tensor_names(module_name: str, module: nn.Module) -> list[str]:
    prefix = f"{module_name}." if module_name else ""
    return [prefix + name for name, _ in module.named_parameters(recurse=False)]


def _weight_name(model: nn.Module, module: nn.Module | None) -> str | None:
    if module is None:
        return None
    for module_name, candidate in model.named_modules():
        if candidate is module:
            return f"{module_name}.weight" if module_name else "weight"
    return None


def config_roles(config: dict) -> Roles | None:
    """The roles for a checkpoint's config.json; None when transformers cannot build its class."""
    model = meta_model(config)
    return _roles_of(json.dumps(config, sort_keys=True)) if model is not None else None


@lru_cache(maxsize=32)
def _roles_of(config_json: str) -> Roles:
    return module_roles(_meta_model(config_json))


def meta_model(config: dict) -> nn.Module | None:
    """transformers' causal-LM class for `config`, built on the meta device (None: it has none)."""
    return _meta_model(json.dumps(config, sort_keys=True))


@lru_cache(maxsize=32)
def _meta_model(config_json: str) -> nn.Module | None:
    try:
        from transformers import AutoConfig, AutoModelForCausalLM

        data = json.loads(config_json)
        model_type = data.pop("model_type", None)
        if not model_type:
            return None
        config = AutoConfig.for_model(model_type, **data)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except Exception:  # remote code, an encoder, a config transformers rejects: no structure known
        return None


def check_in_memory(model_dir: ModelDir, *, remote_code: bool = False) -> str:
    """Before a search: the class transformers loads `model_dir` as holds every checkpoint tensor
    (renamed or fused as it may be), so candidates can be merged into it in place. One line for
    the report; a CompatibilityError naming the first tensor it lacks."""
    from evomerge.errors import CompatibilityError

    model = meta_model(model_dir.config)
    model_type = model_dir.config.get("model_type", "unknown")
    if model is None:
        if remote_code:
            return f"{model_type}: remote code, its tensors are checked when a worker loads it"
        raise CompatibilityError(
            f"{model_dir.path}: transformers has no causal-LM class for model_type '{model_type}', "
            "so a search cannot load it to score candidates"
        )
    try:
        from transformers.core_model_loading import revert_weight_conversion

        module_tensors = dict(model.state_dict())
        with torch.no_grad():
            written = set(revert_weight_conversion(model, module_tensors))
    except ImportError:
        written = set(model.state_dict())
    missing = sorted(set(model_dir.tensors) - written)
    if missing:
        raise CompatibilityError(
            f"{model_dir.path}: {type(model).__name__} has no parameter for the checkpoint tensor {missing[0]}"
            f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}, so candidates cannot be merged "
            "into the loaded model"
        )
    return f"{type(model).__name__}: every checkpoint tensor maps onto a parameter of the loaded model"
