"""Turn a mergekit YAML config into a MergePlan, validating everything first.

All checks that can fail on user input happen here, before a single tensor is read: model
paths, architectures, layer counts and ranges, tensor names and shapes, method constraints and
every parameter of every tensor. Resolution follows mergekit's rules exactly:

* precedence: the source's own parameters -> its slice's -> top-level `parameters` -> default;
* a list of numbers is a gradient, interpolated over the layers of a slice (layer j of n sits
  at t = j/(n-1), t = 1 when n = 1); embeddings, final norm and lm_head use t = 0;
* a list of `{filter, value}` picks the first entry whose filter is null, "*" or a substring
  of the tensor name (per-model parameters match the source tensor name, global ones the
  output name); no match falls through to the next level;
* with `models:` the base model, if not listed, is appended as a parameterless source.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from evomerge.config.mergekit_yaml import (
    ConditionalParameter,
    InputSlice,
    MergeConfig,
    ParameterSetting,
    dump_merge_config,
)
from evomerge.config.numbers import coerce_bool, coerce_number, config_warning
from evomerge.dtypes import torch_dtype
from evomerge.errors import CompatibilityError, ConfigError, EvomergeError
from evomerge.io.lora import (
    AdapterModel,
    AdapterRef,
    ModelSource,
    adapter_base,
    is_adapter_dir,
    open_model,
    split_reference,
)
from evomerge.io.model_dir import ModelDir
from evomerge.merge.layout import LayerLayout, model_layout, split_layers
from evomerge.merge.methods import MethodSpec, Param, check_parameters, get_method
from evomerge.merge.plan import MergePlan, TensorRecipe
from evomerge.merge.vocab import Vocabulary, build_vocabulary, config_vocab_size, is_vocab_tensor
from evomerge.suggest import did_you_mean


def evaluate_setting(setting: ParameterSetting | None, tensor_name: str, t: float) -> Any:
    """One parameter value for one tensor at layer position t (None: not set here)."""
    if setting is None:
        return None
    if isinstance(setting, (bool, int, float, str)):
        return setting
    if isinstance(setting, list) and not setting:
        return None
    if isinstance(setting, list) and all(isinstance(e, ConditionalParameter) for e in setting):
        for condition in setting:
            if condition.filter is None or condition.filter == "*" or condition.filter in tensor_name:
                return evaluate_setting(condition.value, tensor_name, t)
        return None
    values = list(setting)  # a gradient
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return values[int(t * (len(values) - 1))]  # a step function over non-numbers
    scaled = t * (len(values) - 1)
    low = int(scaled)
    high = min(len(values) - 1, low + 1)
    frac = scaled - low
    return (1 - frac) * values[low] + frac * values[high]


def resolve_model_path(reference: str, config_dir: Path | None) -> Path:
    """A model reference -> a local directory (relative paths: CWD first, then the config's folder)."""
    path = Path(os.path.expanduser(reference))
    candidates = [path] if path.is_absolute() else [Path.cwd() / path] + ([config_dir / path] if config_dir else [])
    for candidate in candidates:
        if candidate.is_dir():
            return candidate.resolve()
    hint = (
        " (looks like a hub id; evomerge reads local directories only: download it first)"
        if "/" in reference and not path.is_absolute() and reference.count("/") == 1
        else ""
    )
    raise FileNotFoundError(f"model '{reference}' is not a local directory{hint}")


def resolve_model_source(reference: str, config_dir: Path | None) -> ModelSource:
    """A model reference -> its folder, or (base, adapter) for mergekit's `base+adapter` and for a
    LoRA adapter folder given alone (its base: the adapter config's base_model_name_or_path)."""
    parts = split_reference(reference)
    if parts is not None:
        base, adapter = (resolve_model_path(part, config_dir) for part in parts)
        if not is_adapter_dir(adapter):
            raise FileNotFoundError(
                f"'{parts[1]}' in '{reference}' is not a PEFT adapter folder (no adapter_config.json)"
            )
        return AdapterRef(base, adapter)
    path = resolve_model_path(reference, config_dir)
    return AdapterRef(adapter_base(path), path) if is_adapter_dir(path) else path


def shape_mismatch_hint(tensor_name: str, shapes: Sequence[Sequence[int]]) -> str:
    """Why one tensor's shapes differ across models, in words a user can act on."""
    ranks = {len(shape) for shape in shapes}
    differing = [d for d in range(min(ranks)) if len({shape[d] for shape in shapes}) > 1] if len(ranks) == 1 else None
    if differing == [0] and any(key in tensor_name for key in ("embed", "lm_head", "wte")):
        return " (different vocabularies: set tokenizer_source: union, base or a model to align them)"
    return " (different model sizes: compare hidden_size, intermediate_size and the head counts in their config.json)"


def describe_name_difference(
    path: Path, where: str, names: set[str], reference_path: Path, reference_where: str, reference: set[str]
) -> str:
    """Which model lacks which tensors (and which has extra ones), naming each side correctly."""
    missing = sorted(reference - names)
    extra = sorted(names - reference)
    other = " ".join(str(part) for part in (reference_path, reference_where) if part)
    parts = []
    if missing:
        parts.append(f"lacks {missing[:3]}{' ...' if len(missing) > 3 else ''} that {other} has")
    if extra:
        parts.append(f"has {extra[:3]}{' ...' if len(extra) > 3 else ''} that {other} does not")
    subject = " ".join(str(part) for part in (f"{path}:", where) if part)
    return f"{subject} " + " and ".join(parts) + " (different architectures?)"


@dataclass(frozen=True)
class _Slice:
    """A slice after normalisation: sources with their layer ranges and parameters."""

    sources: tuple[InputSlice, ...]
    base: str | None
    parameters: Mapping[str, ParameterSetting] | None
    field: str  # where it came from, for error messages


class Planner:
    def __init__(
        self,
        config: MergeConfig,
        *,
        config_path: Path | None = None,
        seed: int = 0,
        allow_pickle: bool = False,
        allow_crimes: bool = False,
        model_dirs: Mapping[str, ModelDir | AdapterModel] | None = None,
        named_models: Mapping[str, Path] | None = None,
    ):
        self.config = config
        self.file = config_path
        self.seed = seed
        self.allow_crimes = allow_crimes
        self.allow_pickle = allow_pickle
        self.models: dict[str, ModelDir | AdapterModel] = dict(model_dirs or {})
        self.named_models = dict(named_models or {})  # earlier documents of a multi-merge file
        self.warnings: list[str] = []  # accepted but unusual values, one line each (also logged)
        self._filters: list[tuple[str, str]] = []  # (field, tensor-name substring) of every filter entry
        self._vocab: Vocabulary | None = None  # differing vocabularies: the output vocabulary
        self._vocab_names: set[str] = set()  # the non-layer tensors, which may be vocabulary-sized
        self._vocab_tensors: dict[str, str | None] = {}  # aligned output tensor -> its slice's base

    def error(self, message: str, field: str | None = None) -> ConfigError:
        return ConfigError(message, file=self.file, field=field)

    # -- steps ----------------------------------------------------------------------------------
    def plan(self) -> MergePlan:
        try:
            method = get_method(self.config.merge_method)
        except ValueError as exc:
            raise self.error(str(exc), "merge_method") from None
        self._check_parameters(method)
        self._open_models()
        self._check_architectures()
        slices = self._normalise_slices(method)
        # Which tensors are embeddings and which the head matters only when slices take them from
        # different models; one slice needs no model class (and no transformers import).
        layouts = {
            ref: model_layout(model) if len(slices) > 1 else split_layers(model.tensors, source=str(model.path))
            for ref, model in self.models.items()
        }
        recipes: list[TensorRecipe] = []
        first, last = slices[0], slices[-1]
        donor = self._donor()
        donor_layout = layouts[donor]
        self._plan_vocabulary(set(donor_layout.pre) | set(donor_layout.post))
        for name in donor_layout.pre:
            recipes.append(self._recipe(method, name, first, [(s.model, name) for s in first.sources], t=0.0))
        out_layer = 0
        layer_origins: list[int] = []  # the source layer each output layer came from
        for out_slice in slices:
            span = out_slice.sources[0].layer_range[1] - out_slice.sources[0].layer_range[0]
            for offset in range(span):
                t = offset / (span - 1) if span > 1 else 1.0
                head = out_slice.sources[0]
                head_layout = layouts[head.model]
                suffixes = head_layout.layers[head.layer_range[0] + offset]
                for source in out_slice.sources[1:]:
                    other = layouts[source.model].layers[source.layer_range[0] + offset]
                    if other != suffixes:
                        raise CompatibilityError(
                            describe_name_difference(
                                self.models[source.model].path,
                                f"layer {source.layer_range[0] + offset}",
                                set(other),
                                self.models[head.model].path,
                                f"layer {head.layer_range[0] + offset}",
                                set(suffixes),
                            )
                        )
                for suffix in suffixes:
                    inputs = [
                        (s.model, layouts[s.model].layer_tensor(s.layer_range[0] + offset, suffix))
                        for s in out_slice.sources
                    ]
                    out_name = donor_layout.layer_tensor(out_layer, suffix) if donor_layout.prefix else inputs[0][1]
                    recipes.append(self._recipe(method, out_name, out_slice, inputs, t=t))
                layer_origins.append(head.layer_range[0] + offset)
                out_layer += 1
        for name in donor_layout.post:
            inputs = [(s.model, self._post_tensor_name(s.model, name, layouts[s.model])) for s in last.sources]
            recipes.append(self._recipe(method, name, last, inputs, t=0.0))
        self._warn_unmatched_filters(recipes)
        math_dtype = torch_dtype(self.config.dtype) if self.config.dtype else None
        out_dtype = (
            torch_dtype(self.config.out_dtype)
            if self.config.out_dtype
            else math_dtype or self.models[donor].tensors[recipes[0].inputs[0][1]].dtype
        )
        return MergePlan(
            models={ref: model.path for ref, model in self.models.items()},
            tensors=tuple(recipes),
            math_dtype=math_dtype,
            out_dtype=out_dtype,
            config_donor=donor,
            tokenizer_donor=self._tokenizer_donor(),
            num_hidden_layers=out_layer,
            vocab=replace(self._vocab, tensors=dict(self._vocab_tensors)) if self._vocab else None,
            layer_origins=tuple(layer_origins),
            seed=self.seed,
            recipe_yaml=dump_merge_config(self.config),
        )

    def _open_models(self) -> None:
        config_dir = self.file.parent if self.file else None
        for field, reference in self._reference_fields():
            if reference in self.models:
                continue
            try:
                path = self.named_models.get(reference) or resolve_model_source(reference, config_dir)
            except (FileNotFoundError, EvomergeError) as exc:  # EvomergeError: an adapter without its base
                raise self.error(str(exc), field) from None
            self.models[reference] = open_model(path, allow_pickle=self.allow_pickle)

    def _reference_fields(self) -> list[tuple[str, str]]:
        fields = []
        for i, model in enumerate(self.config.models or ()):
            fields.append((f"models.{i}.model", model.model))
        for i, out_slice in enumerate(self.config.slices or ()):
            for j, source in enumerate(out_slice.sources):
                fields.append((f"slices.{i}.sources.{j}.model", source.model))
            if out_slice.base_model:
                fields.append((f"slices.{i}.base_model", out_slice.base_model))
        if self.config.base_model:
            fields.append(("base_model", self.config.base_model))
        if self.config.tokenizer_source not in (None, "base", "union"):
            fields.append(("tokenizer_source", self.config.tokenizer_source))
        if self.config.tokenizer is not None and self.config.tokenizer.source not in ("base", "union"):
            fields.append(("tokenizer.source", self.config.tokenizer.source))
        return fields

    def _check_architectures(self) -> None:
        archs = {ref: model.architecture for ref, model in self.models.items()}
        if len(set(archs.values())) > 1 and not self.allow_crimes:
            listing = ", ".join(f"{ref}: {arch}" for ref, arch in archs.items())
            raise CompatibilityError(
                f"models have different architectures ({listing}); pass --allow-crimes to try anyway"
            )

    def _normalise_slices(self, method: MethodSpec) -> list[_Slice]:
        config = self.config
        slices: list[_Slice] = []
        if config.models is not None:
            counts = {}
            for i, model in enumerate(config.models):
                counts[model.model] = self._layer_count(model.model, f"models.{i}.model")
            sources = [
                InputSlice(model=m.model, layer_range=(0, counts[m.model]), parameters=m.parameters)
                for m in config.models
            ]
            if config.base_model and config.base_model not in counts:
                count = self._layer_count(config.base_model, "base_model")
                sources.append(InputSlice(model=config.base_model, layer_range=(0, count)))
                counts[config.base_model] = count
            if len(set(counts.values())) > 1:
                listing = ", ".join(f"{ref}: {n}" for ref, n in counts.items())
                raise self.error(
                    f"models have different layer counts ({listing}); use 'slices:' with layer_range to combine them",
                    "models",
                )
            slices.append(_Slice(tuple(sources), config.base_model, None, "models"))
        else:
            for i, out_slice in enumerate(config.slices or ()):
                for j, source in enumerate(out_slice.sources):
                    count = self._layer_count(source.model, f"slices.{i}.sources.{j}.model")
                    if source.layer_range[1] > count:
                        raise self.error(
                            f"layer_range {list(source.layer_range)} is outside the model's {count} layers",
                            f"slices.{i}.sources.{j}.layer_range",
                        )
                base = out_slice.base_model or config.base_model
                slices.append(_Slice(tuple(out_slice.sources), base, out_slice.parameters, f"slices.{i}"))
        for out_slice in slices:
            self._check_method_inputs(method, out_slice)
        return slices

    def _layer_count(self, reference: str, field: str) -> int:
        model = self.models[reference]
        layout = split_layers(model.tensors, source=str(model.path))  # the count needs no model class
        declared = model.num_hidden_layers
        if declared is not None and declared != layout.num_layers:
            raise CompatibilityError(
                f"{model.path}: config.json says {declared} layers but the weights hold {layout.num_layers}"
            )
        return layout.num_layers

    def _check_method_inputs(self, method: MethodSpec, out_slice: _Slice) -> None:
        refs = [s.model for s in out_slice.sources]
        if len(set(refs)) != len(refs):
            raise self.error("the same model is listed twice", out_slice.field)
        if method.base == "required":
            if not out_slice.base:
                raise self.error(f"{method.name} needs a base_model", "base_model")
            if out_slice.base not in refs:
                raise self.error(f"base_model '{out_slice.base}' must be one of the slice's sources", out_slice.field)
        count = len(refs)
        if count < method.min_models or (method.max_models is not None and count > method.max_models):
            expected = (
                f"exactly {method.min_models}"
                if method.max_models == method.min_models
                else f"at least {method.min_models}"
                if method.max_models is None
                else f"{method.min_models} to {method.max_models}"
            )
            raise self.error(f"{method.name} takes {expected} models (base included), got {count}", out_slice.field)

    def _check_parameters(self, method: MethodSpec) -> None:
        """Every parameter of every scope: a name the method takes and a value of the right kind.

        Values go through the one coercion of config numbers (no strings, booleans or non-finite
        values where a number goes) and the declared ranges; the config is rebuilt with the
        coerced values, so gradients of numeric strings interpolate like numbers.
        """
        config = self.config
        update: dict[str, Any] = {"parameters": self._coerce_scope(method, config.parameters, "parameters")}
        if config.models is not None:
            update["models"] = [
                model.model_copy(
                    update={"parameters": self._coerce_scope(method, model.parameters, f"models.{i}.parameters")}
                )
                for i, model in enumerate(config.models)
            ]
        if config.slices is not None:
            slices = []
            for i, out_slice in enumerate(config.slices):
                sources = [
                    source.model_copy(
                        update={
                            "parameters": self._coerce_scope(
                                method, source.parameters, f"slices.{i}.sources.{j}.parameters"
                            )
                        }
                    )
                    for j, source in enumerate(out_slice.sources)
                ]
                slices.append(
                    out_slice.model_copy(
                        update={
                            "sources": sources,
                            "parameters": self._coerce_scope(method, out_slice.parameters, f"slices.{i}.parameters"),
                        }
                    )
                )
            update["slices"] = slices
        self.config = config.model_copy(update=update)

    def _coerce_scope(self, method: MethodSpec, params: Mapping[str, Any] | None, field: str) -> dict[str, Any] | None:
        if params is None:
            return None
        known = {**method.model_params, **method.global_params}
        coerced = {}
        for name, setting in params.items():
            if name not in known:
                hint = did_you_mean(name, known)
                raise self.error(
                    f"{method.name} has no parameter '{name}' (it takes: {', '.join(sorted(known)) or 'none'}){hint}",
                    f"{field}.{name}",
                )
            coerced[name] = self._coerce_setting(setting, method.param(name), f"{field}.{name}")
        return coerced

    def _coerce_setting(self, setting: Any, param: Param, field: str) -> Any:
        if isinstance(setting, list) and setting and all(isinstance(e, ConditionalParameter) for e in setting):
            self._filters.extend(
                (f"{field}.{i}.filter", e.filter) for i, e in enumerate(setting) if e.filter not in (None, "*")
            )
            return [
                entry.model_copy(update={"value": self._coerce_setting(entry.value, param, f"{field}.{i}.value")})
                for i, entry in enumerate(setting)
            ]
        if isinstance(setting, list):
            return [self._coerce_value(value, param, f"{field}.{i}") for i, value in enumerate(setting)]
        return self._coerce_value(setting, param, field)

    def _coerce_value(self, value: Any, param: Param, field: str) -> Any:
        try:
            if param.is_bool:
                return coerce_bool(value)
            number = coerce_number(value)
            problem = param.valid.check(number)
        except ValueError as exc:
            raise self.error(str(exc), field) from None
        if problem:
            self.warnings.append(config_warning(problem, file=self.file, field=field))
        return number

    def _warn_unmatched_filters(self, recipes: Sequence[TensorRecipe]) -> None:
        """A filter no tensor name contains never applies (a typo, another architecture's names):
        mergekit accepts it silently; say so in one line naming the field."""
        names = {r.name for r in recipes} | {name for r in recipes for _, name in r.inputs}
        for field, substring in self._filters:
            if not any(substring in name for name in names):
                self.warnings.append(
                    config_warning(
                        f"filter '{substring}' matches no tensor of this merge, so its value is never used",
                        file=self.file,
                        field=field,
                    )
                )

    def _donor(self) -> str:
        if self.config.base_model:
            return self.config.base_model
        first_slice_sources = self.config.models or (self.config.slices[0].sources if self.config.slices else [])
        return first_slice_sources[0].model

    def _tokenizer_donor(self) -> str:
        source = self.config.vocabulary_source()
        if source in (None, "base", "union"):
            return self._donor()
        return source

    # -- differing vocabularies (merge/vocab.py) --------------------------------------------------
    def _plan_vocabulary(self, non_layer: set[str]) -> None:
        """Build the output vocabulary when the config asks for one (any tokenizer source)."""
        source = self.config.vocabulary_source()
        if source is None:
            return
        section = self.config.tokenizer
        self._vocab = build_vocabulary(
            source=source,
            paths={ref: model.path for ref, model in self.models.items()},
            vocab_sizes={ref: config_vocab_size(model.config) for ref, model in self.models.items()},
            models=self.config.referenced_models(),
            tokenizer_base=self._donor(),
            tokens=section.tokens if section else None,
            pad_to_multiple_of=section.pad_to_multiple_of if section else None,
            file=self.file,
            field="tokenizer" if section else "tokenizer_source",
        )
        self._vocab_names = non_layer

    def _aligned_shape(self, out_name: str, out_slice: _Slice, shapes: dict[str, tuple[int, ...]]):
        """The output shape of an embedding or output head read through the vocabulary
        permutation (None for any other tensor)."""
        if self._vocab is None or out_name not in self._vocab_names:
            return None
        if not all(is_vocab_tensor(shape, config_vocab_size(self.models[ref].config)) for ref, shape in shapes.items()):
            return None
        width = {shape[1:] for shape in shapes.values()}
        if len(width) > 1:
            return None  # different hidden sizes: the shape check says so
        try:
            self._vocab.check(list(shapes), out_slice.base, [shape[0] for shape in shapes.values()])
        except ConfigError as exc:
            raise ConfigError(str(exc), file=self.file) from None
        self._vocab_tensors[out_name] = out_slice.base
        return (self._vocab.size, *next(iter(width)))

    def _post_tensor_name(self, ref: str, name: str, layout: LayerLayout) -> str:
        tensors = self.models[ref].tensors
        if name in tensors:
            return name
        embedding = layout.input_embedding or model_layout(self.models[ref]).input_embedding
        if embedding and _is_output_head(self.models[self._donor()], name):
            return embedding  # a tied source: its output head is its input embedding
        raise CompatibilityError(
            f"{self.models[ref].path}: has no tensor {name} ({self.models[self._donor()].path} has it)"
        )

    # -- one tensor ---------------------------------------------------------------------------
    def _recipe(
        self, method: MethodSpec, out_name: str, out_slice: _Slice, inputs: Sequence[tuple[str, str]], *, t: float
    ) -> TensorRecipe:
        shapes = {}
        for ref, name in inputs:
            info = self.models[ref].tensors.get(name)
            if info is None:
                raise CompatibilityError(f"{self.models[ref].path}: has no tensor {name} (needed for {out_name})")
            shapes[ref] = info.shape
        aligned = self._aligned_shape(out_name, out_slice, shapes)
        if aligned is not None:
            shapes = dict.fromkeys(shapes, aligned)
        if len(set(shapes.values())) > 1:
            listing = ", ".join(f"{r}: {list(s)}" for r, s in shapes.items())
            raise CompatibilityError(
                f"tensor {out_name} has different shapes ({listing}){shape_mismatch_hint(out_name, list(shapes.values()))}"
            )
        refs = [ref for ref, _ in inputs]
        base_index = refs.index(out_slice.base) if out_slice.base in refs and method.base != "unused" else None
        global_params = {}
        for name, default in method.global_params.items():
            value = self._lookup(name, out_name, t, [out_slice.parameters, self.config.parameters])
            if value is None:
                if default is None:
                    raise self.error(f"{method.name} needs parameter '{name}' (set it under parameters)", "parameters")
                value = default
            global_params[name] = value
        model_params = []
        for index, (ref, source_name) in enumerate(inputs):
            params = {}
            if index != base_index:
                source = out_slice.sources[index]
                for name, default in method.model_params.items():
                    value = self._lookup(
                        name, source_name, t, [source.parameters, out_slice.parameters, self.config.parameters]
                    )
                    if value is None:
                        if default is None:
                            raise self.error(
                                f"{method.name} needs parameter '{name}' for model '{ref}' "
                                "(set it on the model or under top-level parameters)",
                                f"{out_slice.field}.{index}.parameters"
                                if out_slice.field != "models"
                                else f"models.{index}.parameters",
                            )
                        continue
                    params[name] = value
            model_params.append(params)
        try:
            check_parameters(method.name, model_params, global_params, base_index)
        except ValueError as exc:
            raise self.error(f"{exc} (tensor {out_name})", out_slice.field) from None
        return TensorRecipe(
            name=out_name,
            method=method.name,
            inputs=tuple(inputs),
            base_index=base_index,
            model_params=tuple(model_params),
            global_params=global_params,
            shape=next(iter(shapes.values())),
        )

    @staticmethod
    def _lookup(name: str, tensor_name: str, t: float, scopes: Sequence[Mapping[str, Any] | None]) -> Any:
        for scope in scopes:
            if scope and name in scope:
                value = evaluate_setting(scope[name], tensor_name, t)
                if value is not None:
                    return value
        return None


def _is_output_head(model: ModelDir, name: str) -> bool:
    """Whether `name` is the output head of `model` (from its class; by name if it has none known)."""
    from evomerge.merge.structure import config_roles

    roles = config_roles(model.config)
    return roles.output_embedding == name if roles else name == "lm_head.weight"


def plan_merge(
    config: MergeConfig,
    *,
    config_path: Path | None = None,
    seed: int = 0,
    allow_pickle: bool = False,
    allow_crimes: bool = False,
    named_models: Mapping[str, Path] | None = None,
) -> MergePlan:
    """Validate a mergekit config against the real checkpoints and build its MergePlan."""
    return Planner(
        config,
        config_path=config_path,
        seed=seed,
        allow_pickle=allow_pickle,
        allow_crimes=allow_crimes,
        named_models=named_models,
    ).plan()
