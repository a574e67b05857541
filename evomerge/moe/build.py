"""`evomerge moe`: assemble a mixture of experts from same-shape dense models.

Attention, norms, embeddings and head come from `base_model`; layer i's expert e is expert e's
dense MLP of layer i, in the order the YAML lists them; the router rows come from `gates.py`.
The output is written through `staged_output` (a failed run leaves nothing; an earlier output is
replaced only with `overwrite`), tensor by tensor from the sources' files.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from evomerge.dtypes import normalize_dtype, torch_dtype
from evomerge.errors import CompatibilityError, ConfigError, first_line
from evomerge.io.checkpoint import copy_tokenizer
from evomerge.io.model_dir import ModelDir
from evomerge.io.output_dir import check_free_space, staged_output
from evomerge.io.safetensors_io import StreamingCheckpointWriter
from evomerge.moe import gates
from evomerge.moe.config import MoEConfig, load_moe_config
from evomerge.moe.layout import INPUT_TYPES, PROJECTIONS, OutputLayout, dense_mlp, output_config
from evomerge.progress import progress_bar

RECIPE_FILE = "mergekit_moe_config.yml"  # the YAML as given: `mergekit-moe` reads it too


@dataclass(frozen=True)
class MoEReport:
    out_dir: Path
    architecture: str
    experts: int
    layers: int
    seconds: float


def build_moe(
    config_path: Path, out_dir: Path, *, overwrite: bool = False, seed: int = 0, progress: bool = True
) -> MoEReport:
    """Write the MoE that `config_path` describes into `out_dir` (see the module docstring)."""
    started = time.perf_counter()
    config_path = Path(config_path)
    config = load_moe_config(config_path)
    recipe_text = config_path.read_text()
    with opened_models(config) as models:
        protected = {"a source model": [m.path for m in models.values()]}
        with staged_output(out_dir, overwrite=overwrite, protected=protected) as staged:
            written = write_moe(config, config_path, recipe_text, models, staged.staging, seed=seed, progress=progress)
            staged.commit(verify=lambda directory: _verify(directory, written.tensors))
    return MoEReport(
        Path(out_dir), written.architecture, len(config.experts), written.layers, time.perf_counter() - started
    )


@dataclass(frozen=True)
class WrittenMoE:
    architecture: str
    layers: int
    tensors: dict[str, tuple[int, ...]]  # every written tensor's name and shape


def write_moe(
    config: MoEConfig,
    config_path: Path,
    recipe_text: str,
    models: dict[str, ModelDir],
    out_dir: Path,
    *,
    seed: int = 0,
    progress: bool = False,
) -> WrittenMoE:
    """Write the MoE's tensors, config, tokenizer and recipe into the (staging) folder `out_dir`;
    `models` holds every model `config` names, open."""
    base = models[config.base_model]
    architecture = check_family(config, config_path, base, models)
    layout = OutputLayout(architecture)
    layers = int(base.num_hidden_layers or 0)
    out_dtype = torch_dtype(config.dtype or _base_dtype(base))
    rows = router_weights(config, config_path, base, layers, seed=seed, progress=progress)
    names = _layout(config, layout, base, layers, out_dtype)
    check_free_space(out_dir, sum(torch.Size(s).numel() * out_dtype.itemsize for s in names.values()))
    _write_tensors(config, layout, models, base, layers, rows, names, out_dtype, out_dir, progress)
    output_config(
        architecture,
        base.config,
        experts=len(config.experts),
        experts_per_token=config.experts_per_token,
        dtype=out_dtype,
    ).save_pretrained(out_dir)
    copy_tokenizer(base.path, out_dir)
    (Path(out_dir) / RECIPE_FILE).write_text(recipe_text)
    return WrittenMoE(architecture, layers, names)


@contextmanager
def opened_models(config: MoEConfig) -> Iterator[dict[str, ModelDir]]:
    """Every model the config names (base first), open; closed on the way out."""
    models = _open_models(config, [*config.experts, *(config.shared_experts or [])])
    try:
        yield models
    finally:
        for model in models.values():
            model.close()


def _open_models(config: MoEConfig, experts) -> dict[str, ModelDir]:
    models: dict[str, ModelDir] = {}
    try:
        for reference in [config.base_model, *(e.source_model for e in experts)]:
            if reference not in models:
                models[reference] = ModelDir(reference)
    except BaseException:
        for model in models.values():
            model.close()
        raise
    return models


def _base_dtype(base: ModelDir) -> str:
    name = base.config.get("dtype") or base.config.get("torch_dtype") or "float32"
    return normalize_dtype(str(name))


def check_family(config: MoEConfig, config_path: Path, base: ModelDir, models: dict[str, ModelDir]) -> str:
    """The output architecture; refuses a family it cannot take and experts of another shape."""
    model_type = str(base.config.get("model_type"))
    architecture = config.output_architecture(model_type)
    if model_type not in INPUT_TYPES[architecture]:
        raise ConfigError(
            f"{base.path} is a {model_type} model; {architecture} output takes {', '.join(INPUT_TYPES[architecture])} models",
            file=config_path,
            field="base_model",
        )
    shared = len(config.shared_experts or [])
    if architecture == "qwen2_moe" and shared != 1:
        raise ConfigError(
            f"qwen2_moe output needs exactly one shared expert, got {shared}", file=config_path, field="shared_experts"
        )
    if architecture != "qwen2_moe" and shared:
        raise ConfigError(
            f"{architecture} output has no shared experts; use architecture: qwen2_moe",
            file=config_path,
            field="shared_experts",
        )
    layers = base.num_hidden_layers
    if not layers:
        raise ConfigError(f"{base.path}/config.json has no num_hidden_layers", file=config_path, field="base_model")
    stray = next(
        (n for n in base.tensors if ".mlp." in n and not any(n.endswith(f"mlp.{p}.weight") for p in PROJECTIONS)), None
    )
    if stray:
        raise CompatibilityError(
            f"{base.path}: tensor {stray}: only MLPs of gate/up/down projection weights can become experts"
        )
    wanted = {
        dense_mlp(i, p): tuple(base.tensors[dense_mlp(i, p)].shape)
        for i in range(layers)
        for p in PROJECTIONS
        if dense_mlp(i, p) in base.tensors
    }
    if len(wanted) != layers * len(PROJECTIONS):
        raise CompatibilityError(f"{base.path}: expected gate/up/down projections in every one of its {layers} layers")
    for expert in [*config.experts, *(config.shared_experts or [])]:
        model = models[expert.source_model]
        if model.config.get("model_type") not in INPUT_TYPES[architecture]:
            raise CompatibilityError(
                f"{model.path} is a {model.config.get('model_type')} model; {architecture} output takes "
                f"{', '.join(INPUT_TYPES[architecture])} models"
            )
        if model.num_hidden_layers != layers:
            raise CompatibilityError(
                f"{model.path}: {model.num_hidden_layers} layers, the base {base.path} has {layers}; every expert needs the base's shape"
            )
        for name, shape in wanted.items():
            info = model.tensors.get(name)
            if info is None or tuple(info.shape) != shape:
                found = "no such tensor" if info is None else f"shape {tuple(info.shape)}"
                raise CompatibilityError(
                    f"{model.path}: {name} has {found}, the base {base.path} has shape {shape}; every expert needs the base's MLP shapes"
                )
    return architecture


def readable_prompt_ids(tokenizer, text: str, *, file: object, field: str) -> list[int]:
    """A prompt's token ids (no special tokens); a one-line error naming `field` when they cannot
    place a router row: no tokens, or only the unknown token."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if [i for i in ids if i != tokenizer.unk_token_id]:
        return ids
    what = "no tokens" if not ids else "only the unknown token"
    raise ConfigError(
        f"{text!r} gives {what} in the base model's tokenizer; expected text it can read", file=file, field=field
    )


def base_tokenizer(base: ModelDir, config_path: Path, gate_mode: str):
    """The base's tokenizer, which reads the prompts; a one-line error when it does not load."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(base.path)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"{base.path} has no tokenizer that loads ({first_line(exc, 120)}); "
            f"gate_mode {gate_mode} reads the prompts with the base's tokenizer",
            file=config_path,
            field="base_model",
        ) from None


def _prompt_ids(config: MoEConfig, config_path: Path, tokenizer) -> list[tuple[list[list[int]], list[list[int]]]]:
    """Each expert's prompts as token ids with BOS first; refuses a prompt that gives no token the
    base knows (empty, or only the unknown token)."""
    bos = tokenizer.bos_token_id
    result = []
    for group, members in (("experts", config.experts), ("shared_experts", config.shared_experts or [])):
        for index, expert in enumerate(members):
            lists = []
            for kind in ("positive_prompts", "negative_prompts"):
                ids_of_kind = []
                for number, text in enumerate(getattr(expert, kind) or []):
                    field = f"{group}[{index}].{kind}[{number}]"
                    ids = readable_prompt_ids(tokenizer, text, file=config_path, field=field)
                    ids_of_kind.append(([bos] if bos is not None else []) + ids)
                lists.append(ids_of_kind)
            result.append((lists[0], lists[1]))
    return result


def router_weights(
    config: MoEConfig, config_path: Path, base: ModelDir, layers: int, *, seed: int, progress: bool
) -> torch.Tensor:
    """(layers, experts + shared experts, hidden) router rows (see `gates`)."""
    hidden = int(base.config["hidden_size"])
    count = len(config.experts) + len(config.shared_experts or [])
    if config.gate_mode == "random":
        return gates.random_rows(layers, count, hidden, seed)
    tokenizer = base_tokenizer(base, config_path, config.gate_mode)
    prompts = _prompt_ids(config, config_path, tokenizer)
    pad_id = next((i for i in (tokenizer.bos_token_id, tokenizer.eos_token_id) if i is not None), 0)
    if config.gate_mode == "cheap_embed":
        embed = base.get(next(n for n in base.tensors if n.endswith("embed_tokens.weight")))

        def prompt_vectors(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return gates.embedding_sum(embed, input_ids, attention_mask).repeat(layers, 1)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(base.path, dtype=torch.bfloat16).eval()
        prompt_vectors = gates.base_hidden_states(model)
    rows = []
    with progress_bar(len(prompts), f"router rows ({config.gate_mode})", enabled=progress, unit="experts") as bar:
        for pair in prompts:
            rows.append(gates.router_rows([pair], prompt_vectors, pad_id=pad_id))
            bar.advance()
    return torch.cat(rows, dim=1)


def _layout(
    config: MoEConfig, layout: OutputLayout, base: ModelDir, layers: int, out_dtype
) -> dict[str, tuple[int, ...]]:
    """Every output tensor's name and shape, in writing order."""
    names = {n: tuple(info.shape) for n, info in base.tensors.items() if ".mlp." not in n}
    hidden = int(base.config["hidden_size"])
    for layer in range(layers):
        for expert in range(len(config.experts)):
            for projection in PROJECTIONS:
                names[layout.expert(layer, expert, projection)] = tuple(
                    base.tensors[dense_mlp(layer, projection)].shape
                )
        names[layout.router(layer)] = (len(config.experts), hidden)
        if layout.has_shared_expert:
            for projection in PROJECTIONS:
                names[layout.shared_expert(layer, projection)] = tuple(base.tensors[dense_mlp(layer, projection)].shape)
            names[layout.shared_router(layer)] = (1, hidden)
        q_rows = base.tensors[f"model.layers.{layer}.self_attn.q_proj.weight"].shape[0]
        kv_rows = base.tensors[f"model.layers.{layer}.self_attn.k_proj.weight"].shape[0]
        for name, shape in layout.zero_biases(layer, q_rows, kv_rows).items():
            names.setdefault(name, shape)
    return names


def _write_tensors(config, layout, models, base, layers, rows, names, out_dtype, out_dir, progress) -> None:
    experts = config.experts
    shared = (config.shared_experts or [None])[0]
    with (
        progress_bar(len(names), "writing", enabled=progress, unit="tensors") as bar,
        StreamingCheckpointWriter(out_dir, [(n, s, out_dtype) for n, s in names.items()]) as writer,
    ):

        def put(name: str, tensor: torch.Tensor) -> None:
            writer.write(name, tensor.to(out_dtype).contiguous())
            bar.advance()

        for name, shape in names.items():
            if name in base.tensors and ".mlp." not in name:
                put(name, base.get(name))
            elif name.endswith("_proj.bias") and name not in base.tensors:
                put(name, torch.zeros(shape))
        for layer in range(layers):
            for index, expert in enumerate(experts):
                for projection in PROJECTIONS:
                    put(
                        layout.expert(layer, index, projection),
                        _expert_tensor(models[expert.source_model], expert, layer, projection),
                    )
            put(layout.router(layer), rows[layer, : len(experts)])
            if layout.has_shared_expert:
                for projection in PROJECTIONS:
                    put(
                        layout.shared_expert(layer, projection),
                        _expert_tensor(models[shared.source_model], shared, layer, projection),
                    )
                put(layout.shared_router(layer), rows[layer, len(experts) :])


def _expert_tensor(model: ModelDir, expert, layer: int, projection: str) -> torch.Tensor:
    tensor = model.get(dense_mlp(layer, projection))
    if projection == "down_proj" and expert.residual_scale is not None:
        tensor = tensor * expert.residual_scale
    return tensor


def _verify(directory: Path, names: dict[str, tuple[int, ...]]) -> None:
    written = ModelDir(directory)
    try:
        found = {n: tuple(info.shape) for n, info in written.tensors.items()}
    finally:
        written.close()
    if found != names:
        raise CompatibilityError(
            f"{directory}: the written checkpoint lacks tensors it should hold; nothing was replaced"
        )
