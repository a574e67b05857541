"""A PEFT LoRA adapter over its base model, read as if it were the merged model.

A LoRA adapter folder (`adapter_config.json` + `adapter_model.safetensors`) holds, per target
module, two small factors A (r x in) and B (out x r); PEFT's `merge_and_unload` adds
`scale * B @ A` (transposed for an embedding or a Conv1D) to the base weight, with scale = lora_alpha / r (lora_alpha / sqrt(r) under
rsLoRA) and r, lora_alpha overridden per module by `rank_pattern` / `alpha_pattern`. Tensors
listed in `modules_to_save` are stored whole and replace the base tensor. `AdapterModel` offers a
ModelDir's interface over (base folder, adapter folder): `get(name)` returns that merged tensor,
one at a time, so a merge reads an adapter without a merged checkpoint ever written to disk.

The arithmetic follows PEFT's CPU merge step for step (B @ A in float32 at least, times the
scale, added to the base weight in the wider dtype, rounded to the base's), so the tensors are
bit-identical to `PeftModel.from_pretrained(...).merge_and_unload()` run on CPU.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from evomerge.errors import EvomergeError
from evomerge.io.model_dir import ModelDir, TensorInfo, _read_json, read_safetensors_header

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."  # PEFT's name for the wrapped model in saved keys
# A linear layer's factors are submodules (`q_proj.lora_A.weight`), an embedding's are parameters
# (`embed_tokens.lora_embedding_A`, A: r x vocab, B: dim x r, so its delta is transposed).
_FACTOR = re.compile(r"(?P<module>.+)\.lora_(?:(?P<linear>[AB])\.weight|embedding_(?P<embedding>[AB]))")


@dataclass(frozen=True)
class AdapterRef:
    """A model given as `base+adapter`: the base checkpoint folder and the LoRA adapter folder."""

    base: Path
    adapter: Path

    def __str__(self) -> str:  # mergekit's syntax, so recipes keep the reference as written
        return f"{self.base}+{self.adapter}"


ModelSource = Path | AdapterRef  # what a plan or a genome records per model


def is_adapter_dir(path: Path) -> bool:
    """A PEFT adapter folder (its config, and no full-model config.json beside it)."""
    path = Path(path)
    return (path / ADAPTER_CONFIG).is_file() and not (path / "config.json").is_file()


def model_folder(source: ModelSource) -> Path:
    """The folder whose config.json and tokenizer a model has (an adapter's: its base's)."""
    return source.base if isinstance(source, AdapterRef) else Path(source)


def folders_of(source: ModelSource) -> list[Path]:
    """Every folder a model reads from (an output must not overwrite any of them)."""
    return [source.base, source.adapter] if isinstance(source, AdapterRef) else [Path(source)]


def split_reference(reference: str, root: Path | None = None) -> tuple[str, str] | None:
    """mergekit's `base+adapter` (exactly one '+'); None for a plain reference or an existing path
    (relative paths: under `root`, default the working directory)."""
    if "+" not in reference or (Path(root or ".") / Path(reference).expanduser()).exists():
        return None
    base, _, adapter = reference.partition("+")
    if not base or not adapter or "+" in adapter:
        raise ValueError(f"'{reference}': expected one model and one adapter as 'base+adapter'")
    return base, adapter


def _pattern_key(patterns: dict, module: str) -> str | None:
    """PEFT's rule (peft.utils.other.get_pattern_key): the first pattern, in config order, that
    matches the whole module name or a dot-separated suffix of it, as a regular expression."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


@dataclass(frozen=True)
class LoraSettings:
    """The parts of adapter_config.json that the merged weights depend on."""

    r: int
    lora_alpha: float
    use_rslora: bool = False
    fan_in_fan_out: bool = False
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    base_model_name_or_path: str | None = None

    def rank_and_scale(self, module: str) -> tuple[int, float]:
        """(r, scale) of one module, e.g. 'model.layers.0.self_attn.q_proj'."""
        r_key, alpha_key = _pattern_key(self.rank_pattern, module), _pattern_key(self.alpha_pattern, module)
        r = self.rank_pattern[r_key] if r_key is not None else self.r
        alpha = self.alpha_pattern[alpha_key] if alpha_key is not None else self.lora_alpha
        return r, (alpha / math.sqrt(r) if self.use_rslora else alpha / r)


# Options that change the merged weights in ways this reader does not model: refused, not ignored.
_UNSUPPORTED = {
    "use_dora": "DoRA adapters",
    "lora_bias": "adapters with a LoRA bias",
    "target_parameters": "adapters on nn.Parameter targets",
    "layer_replication": "adapters with layer_replication",
    "trainable_token_indices": "adapters with trainable tokens",
}


def read_adapter_settings(folder: Path) -> LoraSettings:
    """adapter_config.json, checked: a LoRA adapter this reader merges exactly as PEFT does."""
    path = Path(folder) / ADAPTER_CONFIG
    config = _read_json(path)
    if not isinstance(config, dict):
        raise EvomergeError(f"{path}: expected a JSON object (a PEFT adapter config)")
    if config.get("peft_type", "LORA") != "LORA":
        raise EvomergeError(f"{path}: peft_type: expected LORA, got {config.get('peft_type')!r} (only LoRA is read)")
    for key, what in _UNSUPPORTED.items():
        if config.get(key):
            raise EvomergeError(f"{path}: {key}: {what} are not supported; merge it with peft's merge_and_unload first")

    def number(key: str, default=None, *, whole: bool = False):
        value = config.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int if whole else (int, float)) or value <= 0:
            raise EvomergeError(f"{path}: {key}: expected a positive {'whole ' if whole else ''}number, got {value!r}")
        return value

    def patterns(key: str, *, whole: bool) -> dict:
        value = config.get(key) or {}
        kinds = int if whole else (int, float)
        if not isinstance(value, dict) or not all(
            isinstance(v, kinds) and not isinstance(v, bool) and v > 0 for v in value.values()
        ):
            raise EvomergeError(f"{path}: {key}: expected a mapping of module patterns to positive numbers")
        return dict(value)

    base = config.get("base_model_name_or_path")
    return LoraSettings(
        r=number("r", 8, whole=True),
        lora_alpha=number("lora_alpha", 8),
        use_rslora=bool(config.get("use_rslora", False)),
        fan_in_fan_out=bool(config.get("fan_in_fan_out", False)),
        rank_pattern=patterns("rank_pattern", whole=True),
        alpha_pattern=patterns("alpha_pattern", whole=False),
        base_model_name_or_path=base if isinstance(base, str) and base else None,
    )


@dataclass(frozen=True)
class LoraFactors:
    """One module's factors: its delta is scale * B @ A (transposed for Conv1D's fan_in_fan_out
    and for an embedding)."""

    a: torch.Tensor  # (r, in)
    b: torch.Tensor  # (out, r)
    scale: float
    fan_in_fan_out: bool

    @property
    def shape(self) -> tuple[int, int]:
        out, inp = self.b.shape[0], self.a.shape[1]
        return (inp, out) if self.fan_in_fan_out else (out, inp)

    def delta(self) -> torch.Tensor:
        """scale * B @ A as PEFT's merge computes it. Half-precision factors are float32 there
        (PeftModel.from_pretrained's default autocast_adapter_dtype), so they are here."""
        a, b = self.a, self.b
        if a.dtype in (torch.float16, torch.bfloat16):
            a, b = a.float(), b.float()
        product = b @ a
        if self.fan_in_fan_out:
            product = product.T
        return product * self.scale

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> LoraFactors:
        return LoraFactors(
            self.a.to(device=device, dtype=dtype),
            self.b.to(device=device, dtype=dtype),
            self.scale,
            self.fan_in_fan_out,
        )

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.a, self.b))


def apply_delta(base: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """base + delta in base's dtype (PEFT's in-place `weight += delta`: computed in the wider dtype)."""
    return (base + delta.to(base.device)).to(base.dtype)


class LoraAdapter:
    """An adapter folder's tensors by the base checkpoint's tensor names: factors and replacements."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.settings = read_adapter_settings(self.folder)
        weights = self.folder / ADAPTER_WEIGHTS
        if not weights.is_file():
            found = (
                "adapter_model.bin (convert it to safetensors)"
                if (self.folder / "adapter_model.bin").is_file()
                else "none"
            )
            raise EvomergeError(f"{self.folder}: no {ADAPTER_WEIGHTS} (found: {found})")
        read_safetensors_header(weights)  # a damaged file: one line, before safetensors' own error
        from safetensors.torch import load_file

        stored = load_file(weights)  # small: factors and a few saved modules
        halves: dict[str, dict[str, torch.Tensor]] = {}
        embeddings: set[str] = set()
        self.replacements: dict[str, torch.Tensor] = {}  # modules_to_save: whole tensors
        for key, tensor in stored.items():
            if not key.startswith(_PREFIX):
                raise EvomergeError(f"{weights}: tensor {key}: expected a name starting with '{_PREFIX}' (a PEFT save)")
            name = key[len(_PREFIX) :]
            if ".lora_" in name:
                match = _FACTOR.fullmatch(name)
                if match is None:
                    raise EvomergeError(
                        f"{weights}: tensor {key}: only linear and embedding factors (lora_A/lora_B .weight, "
                        "lora_embedding_A/B) are supported"
                    )
                if match["embedding"]:
                    embeddings.add(match["module"])
                halves.setdefault(match["module"], {})[match["linear"] or match["embedding"]] = tensor
            else:  # modules_to_save, or an adapted embedding's own weight (PEFT saves it: vocab resizes)
                self.replacements[name.replace(".base_layer.", ".")] = tensor
        self.factors: dict[str, LoraFactors] = {}  # base tensor name -> factors
        for module, pair in sorted(halves.items()):
            if set(pair) != {"A", "B"}:
                raise EvomergeError(f"{weights}: {module} has lora_{''.join(pair)} but not both lora_A and lora_B")
            a, b = pair["A"], pair["B"]
            r, scale = self.settings.rank_and_scale(module)
            if a.dim() != 2 or b.dim() != 2:
                raise EvomergeError(f"{weights}: {module}: only linear-layer factors are supported (not convolutions)")
            if a.shape[0] != r or b.shape[1] != r:
                raise EvomergeError(
                    f"{weights}: {module}: factors {list(a.shape)} and {list(b.shape)} do not have rank {r} "
                    f"(adapter_config.json's r / rank_pattern)"
                )
            transposed = module in embeddings or self.settings.fan_in_fan_out
            self.factors[f"{module}.weight"] = LoraFactors(a, b, scale, transposed)

    @property
    def nbytes(self) -> int:
        return sum(f.nbytes for f in self.factors.values()) + sum(
            t.numel() * t.element_size() for t in self.replacements.values()
        )


class AdapterModel:
    """A base checkpoint with a LoRA adapter applied, read lazily like a ModelDir.

    `tensors` are the base's (the adapter changes values, never names or shapes); `get` returns
    the saved tensor for a modules_to_save one, else the base's, plus the delta for a targeted one."""

    def __init__(self, source: AdapterRef, *, allow_pickle: bool = False, base: ModelDir | None = None):
        self.path = source  # printed in messages as 'base+adapter'
        self.source = source
        self.base = base or ModelDir(source.base, allow_pickle=allow_pickle)
        self.adapter = LoraAdapter(source.adapter)
        self.config = self.base.config
        self.tensors: dict[str, TensorInfo] = dict(self.base.tensors)
        for name, factors in self.adapter.factors.items():
            self._check_target(name, factors.shape, "targets")
        for name, tensor in self.adapter.replacements.items():
            self._check_target(name, tuple(tensor.shape), "saves")
            # Loaded into the base's module, as PEFT does: in the base's dtype.
            self.adapter.replacements[name] = tensor.to(self.base.tensors[name].dtype)

    def _check_target(self, name: str, shape: tuple[int, ...], verb: str) -> None:
        info = self.base.tensors.get(name)
        if info is None:
            raise EvomergeError(
                f"{self.source.adapter}: {verb} {name}, which {self.source.base} does not have (an adapter for another model?)"
            )
        if tuple(info.shape) != tuple(shape):
            raise EvomergeError(
                f"{self.source.adapter}: {name} is {list(shape)} in the adapter, {list(info.shape)} in {self.source.base}"
            )

    architecture = property(lambda self: self.base.architecture)
    num_hidden_layers = property(lambda self: self.base.num_hidden_layers)
    total_bytes = property(lambda self: self.base.total_bytes)

    def find_non_finite(self) -> str | None:
        for name, info in self.tensors.items():
            if info.dtype.is_floating_point and not bool(torch.isfinite(self.get(name)).all()):
                return name
        return None

    def get(self, name: str) -> torch.Tensor:
        """One tensor as merge_and_unload would leave it (CPU)."""
        saved = self.adapter.replacements.get(name)
        base = saved if saved is not None else self.base.get(name)
        factors = self.adapter.factors.get(name)
        return base if factors is None else apply_delta(base, factors.delta())

    def close(self) -> None:
        self.base.close()

    def __repr__(self) -> str:
        return f"AdapterModel({str(self.source)!r}, {len(self.adapter.factors)} adapted tensors)"


def adapter_base(adapter: Path, fallback: Path | None = None, *, hint: str = "") -> Path:
    """The base folder of an adapter given alone: its config's base_model_name_or_path when that
    is a local folder (absolute, or relative to the working directory), else `fallback`."""
    named = read_adapter_settings(adapter).base_model_name_or_path
    if named is not None and Path(named).expanduser().is_dir() and not is_adapter_dir(Path(named).expanduser()):
        return Path(named).expanduser().resolve()
    if fallback is not None:
        return fallback
    said = f"names {named!r}, not a local folder" if named else "names no base model"
    raise EvomergeError(
        f"{adapter}: a LoRA adapter whose adapter_config.json base_model_name_or_path {said}: "
        f"give its base as BASE+{adapter}{hint}"
    )


def open_models(
    sources: Mapping[str, ModelSource], *, allow_pickle: bool = False
) -> dict[str, ModelDir | AdapterModel]:
    """Every model of a space opened once: adapters over the same base share its headers and files."""
    folders: dict[Path, ModelDir] = {}

    def folder(path: Path) -> ModelDir:
        if path not in folders:
            folders[path] = ModelDir(path, allow_pickle=allow_pickle)
        return folders[path]

    return {
        name: AdapterModel(source, base=folder(source.base)) if isinstance(source, AdapterRef) else folder(Path(source))
        for name, source in sources.items()
    }


def open_model(source: ModelSource, *, allow_pickle: bool = False) -> ModelDir | AdapterModel:
    """A model folder, or a base with an adapter, ready to read tensor by tensor."""
    if isinstance(source, AdapterRef):
        return AdapterModel(source, allow_pickle=allow_pickle)
    return ModelDir(source, allow_pickle=allow_pickle)
