"""The `dataflow` genome: which source layers the hidden state passes through, in what order, and
with what scale (Sakana's data-flow-space search).

The slots are the layers of the eligible models laid end to end (`genome.models`, default: every
fine-tune), that stack repeated `repeats` times; a path is the slots whose use gene is set, in slot
order. With `fix_ends` (the default, as in auto-merge-llm's layer-stacking space) every path starts
with the anchor's layer 0 and ends with its last layer; the anchor (the base, else the first
eligible model) also gives the embeddings and the final norm + lm_head. The genes are a static set
of floats, so CMA-ES, TPE, NSGA-II and random sampling all work on them:

- `slot17.use` in [0, 1]: the slot is on the path when the value is 1 - `use_rate` or more
  (default 0.5), so a genome drawn uniformly turns on a `use_rate` share of the slots: with many
  slots and a small `max_depth`, lower it to keep most random paths within depth. A float, not a
  categorical: optuna's CMA-ES samples categorical genes independently of its distribution, and a
  thresholded float is Sakana's own encoding (their indicator genes are CMA-ES reals cut at 0).
- a scale on the residual stream entering each step after the first (the step entering from the
  embeddings is unscaled), by `genome.scale`:
  - `pairs` (default, Sakana's W): one gene per pair of consecutive layers a path can realise,
    `scale.sort.2->reverse.3`; a layer pair shares its gene wherever it occurs on the path.
    Sakana's ablation without W loses over 20%, hence the default.
  - `per_slot`: one gene per slot, `slot17.scale` (and `last.scale` for the fixed last layer).
  - `none`: every scale is 1.
  The default range [0.5, 1.5] is centred on 1 (the unscaled stream), so a sampler that starts in
  the middle of the box (CMA-ES) starts from plain layer stacking; it stays clear of 0, which would
  erase the stream.

PS+DFS: `genome.trials` lists completed trials of parameter-space studies; each is one more source,
`<study>#<trial>`, with the layer layout of its study's donor model (its layers are re-merged in
memory: evomerge.dataflow.sources). The anchor is always a model read from a folder.

`min_depth` / `max_depth` bound the path's steps, the fixed ends included (default: no upper bound
beyond what the slots allow). A path outside them is not clipped into shape: `path()` raises
`InvalidPathError`, and the search records the trial as failed with that reason.

A dataflow genome merges no weights, so `plan()` raises: its candidates are built from
`path(params)` (a `LayerPath`) by the path builder in `evomerge.dataflow`. Raising, rather than
returning None, names that builder at the caller that took the wrong branch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator, model_validator

from evomerge.config.base import StrictModel
from evomerge.config.numbers import Integer, Number, OptionalInteger
from evomerge.dataflow.path import LayerPath, PathStep
from evomerge.errors import CompatibilityError, ConfigError, EvomergeError, InvalidPathError
from evomerge.io.model_dir import ModelDir
from evomerge.merge.layout import split_layers
from evomerge.suggest import did_you_mean

if TYPE_CHECKING:
    from evomerge.config.space import SearchSpace
    from evomerge.dataflow.export import LayerFold

# Config facts two layers must share to run one after the other in one model (a missing key must
# be missing in both). head_dim and num_key_value_heads are compared after their defaults.
CHAIN_KEYS = (
    "hidden_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "partial_rotary_factor",
    "sliding_window",
)

Layer = tuple[str, int]  # (model name, layer index)


class TrialRef(StrictModel):
    """A trial of a parameter-space study whose merged model joins the slot pool (PS+DFS)."""

    study: str
    # `best`: the study's pick as export picks it, resolved whenever the genome is built, so name a
    # number while the PS study still runs (a new best renames the source and its genes).
    trial: Integer | Literal["best"] = Field(..., description="the trial number, or `best` (the study's pick)")
    storage: str | None = None  # None: this space's own search.storage; a relative SQLite path resolves like it


class DataflowGenomeSpec(StrictModel):
    """The space file's `genome:` section for `kind: dataflow` (see the module docstring)."""

    kind: Literal["dataflow"] = "dataflow"
    models: list[str] | None = Field(
        None, description="models whose layers fill the slots (default: the fine-tunes and the trials)"
    )
    trials: list[TrialRef] = Field(default_factory=list, description="PS trials as sources, named `<study>#<trial>`")
    repeats: Integer = Field(1, ge=1, description="times the stack of eligible layers is repeated (Sakana's r)")
    fix_ends: bool = True  # every path starts with the anchor's layer 0 and ends with its last layer
    min_depth: Integer = Field(1, ge=1)
    max_depth: OptionalInteger = Field(None, ge=1)  # None: as deep as the slots allow
    scale: Literal["pairs", "per_slot", "none"] = "pairs"
    scale_range: tuple[Number, Number] = (0.5, 1.5)
    use_rate: Number = Field(
        0.5, gt=0, lt=1, description="share of slots a uniformly drawn genome puts on the path (use gene >= 1 - it)"
    )

    @field_validator("models")
    @classmethod
    def _models(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and not value:
            raise ValueError("list at least one model (or leave it out: every fine-tune)")
        if value is not None and len(set(value)) != len(value):
            raise ValueError(f"a model is listed twice in {value}")
        return value

    @field_validator("scale_range")
    @classmethod
    def _scale_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        low, high = value
        if not 0 < low < high:
            raise ValueError(f"expected 0 < low < high, got {list(value)}")
        return value

    @model_validator(mode="after")
    def _depths(self) -> DataflowGenomeSpec:
        if self.max_depth is not None and self.min_depth > self.max_depth:
            raise ValueError(f"min_depth {self.min_depth} is more than max_depth {self.max_depth}")
        return self

    def merge_methods(self) -> list[str]:
        """A path merges no tensors: no merge method, so the space needs no base for one."""
        return []


@dataclass(frozen=True)
class Slot:
    """One place in the repeated stack of eligible layers."""

    index: int
    model: str
    layer: int

    @property
    def use_gene(self) -> str:
        return f"slot{self.index}.use"


FIRST, LAST = "first", "last"  # the fixed ends' positions (slots are positions by their Slot)
Position = Slot | str


class DataflowGenome:
    """Genome kind `dataflow` (see evomerge.genome.protocol.Genome for what callers use)."""

    def __init__(self, space: SearchSpace, models: Mapping[str, ModelDir] | None = None):
        self.space = space
        self.use_threshold = 1.0 - float(space.genome.use_rate)  # a use gene at or above it: the slot is on
        self.spec: DataflowGenomeSpec = space.genome
        self.finetunes = [m.name for m in space.models]
        self.base = space.base_model.name if space.base_model else None
        for index, model in enumerate(space.models):
            if model.adapter is not None:
                raise ConfigError(
                    "a LoRA adapter cannot be a dataflow genome's source yet (its layers are run as modules); "
                    "use genome kind parameters, or merge it into its base first (peft's merge_and_unload)",
                    file=space.source_path,
                    field=f"models.{index}",
                )
        paths = {m.name: m.path for m in space.models}
        if space.base_model:
            paths[space.base_model.name] = space.base_model.path
        self.paths = paths  # the sources read from folders
        self.models = (
            dict(models)
            if models
            else {name: ModelDir(path, allow_pickle=space.allow_pickle) for name, path in paths.items()}
        )
        from evomerge.dataflow.sources import resolve_trials

        self.trials = resolve_trials(space)  # the sources merged from PS trials (their donor's layout)
        for name, trial in self.trials.items():
            self.models.setdefault(name, trial.donor_dir)
        self.eligible = self._eligible_models()
        self.anchor = self.base or self._first_folder_model()
        self.layer_counts = {name: self._count_layers(name) for name in dict.fromkeys([self.anchor, *self.eligible])}
        self._check_chainable()
        stack = [(model, layer) for model in self.eligible for layer in range(self.layer_counts[model])]
        self.slots = [Slot(index, *stack[index % len(stack)]) for index in range(len(stack) * self.spec.repeats)]
        anchor_last = self.layer_counts[self.anchor] - 1
        self.fixed: dict[str, Layer] = {}
        if self.spec.fix_ends:
            self.fixed[FIRST] = (self.anchor, 0)
            if anchor_last > 0:  # a one-layer anchor's first layer is also its last
                self.fixed[LAST] = (self.anchor, anchor_last)
        self.max_depth = self.spec.max_depth or len(self.slots) + len(self.fixed)
        self._check_depths()
        self._scale_genes = self._name_scale_genes()

    # -- validation ---------------------------------------------------------------------------
    def _error(self, message: str, field: str) -> ConfigError:
        return ConfigError(message, file=self.space.source_path, field=field)

    def _eligible_models(self) -> list[str]:
        if self.spec.models is None:
            return [*self.finetunes, *self.trials]
        known = [*self.paths, *self.trials]
        for index, name in enumerate(self.spec.models):
            if name not in known:
                raise self._error(
                    f"'{name}' is not a model of this space (choose from: {', '.join(known)})"
                    + did_you_mean(name, known),
                    f"genome.models.{index}",
                )
        return list(self.spec.models)

    def _first_folder_model(self) -> str:
        """The anchor without a base: the first eligible model read from a folder (it gives the tokenizer)."""
        for name in self.eligible:
            if name in self.paths:
                return name
        raise self._error("list a model from a folder too, or a base_model: it gives the embeddings", "genome.models")

    def source_ref(self, name: str) -> str:
        """A source as a recipe names it: its folder, or `<study>#<trial>` for a PS trial."""
        return str(self.paths[name]) if name in self.paths else name

    def _count_layers(self, name: str) -> int:
        layout = split_layers(self.models[name].tensors, source=self.source_ref(name))
        if not layout.num_layers:
            raise CompatibilityError(f"{self.source_ref(name)}: no decoder layers found, so none can join a layer path")
        return layout.num_layers

    def _chain_facts(self, name: str) -> dict[str, Any]:
        config = self.models[name].config
        text_config = config.get("text_config")
        if isinstance(text_config, dict):  # a multimodal wrapper: the decoder's settings are nested
            config = {**config, **text_config}
        facts = {key: config.get(key) for key in CHAIN_KEYS}
        if facts["num_key_value_heads"] is None:
            facts["num_key_value_heads"] = facts["num_attention_heads"]
        if facts["head_dim"] is None and facts["hidden_size"] and facts["num_attention_heads"]:
            facts["head_dim"] = facts["hidden_size"] // facts["num_attention_heads"]
        return facts

    def _check_chainable(self) -> None:
        """Every eligible model's layers must run after any other's: one architecture, and the same
        hidden size, attention heads, head size and rotary settings."""
        reference = self.models[self.anchor]
        reference_facts = self._chain_facts(self.anchor)
        for name in self.layer_counts:
            model = self.models[name]
            if model.architecture != reference.architecture:
                raise CompatibilityError(
                    f"{model.path}: architecture {model.architecture} differs from {self.anchor}'s "
                    f"{reference.architecture}: their layers cannot be chained"
                )
            facts = self._chain_facts(name)
            for key in CHAIN_KEYS:
                if facts[key] != reference_facts[key]:
                    raise CompatibilityError(
                        f"{model.path}: {key} {facts[key]!r} differs from {self.anchor}'s {reference_facts[key]!r}: "
                        "their layers cannot be chained"
                    )

    def _check_depths(self) -> None:
        deepest = len(self.slots) + len(self.fixed)
        if len(self.fixed) > self.max_depth:
            raise self._error(
                f"{self.max_depth} is less than the {len(self.fixed)} layers fix_ends puts on every path",
                "genome.max_depth",
            )
        if self.spec.min_depth > deepest:
            raise self._error(
                f"{self.spec.min_depth} is more than the {deepest} steps the slots allow (raise genome.repeats?)",
                "genome.min_depth",
            )

    # -- the genes ------------------------------------------------------------------------------
    def _layer_of(self, position: Position) -> Layer:
        return (position.model, position.layer) if isinstance(position, Slot) else self.fixed[position]

    def _with_ends(self, slots: list[Slot]) -> list[Position]:
        """`slots` between the fixed ends (if any), in path order."""
        first = [FIRST] if FIRST in self.fixed else []
        last = [LAST] if LAST in self.fixed else []
        return [*first, *slots, *last]

    def _name_scale_genes(self) -> dict[Any, str]:
        """Scale gene names by key: a (from layer, to layer) pair, a Slot, or LAST."""
        mode = self.spec.scale
        if mode == "none":
            return {}
        if mode == "per_slot":
            genes: dict[Any, str] = {slot: f"slot{slot.index}.scale" for slot in self.slots}
            if LAST in self.fixed:
                genes[LAST] = "last.scale"
            return genes
        positions = self._with_ends(self.slots)  # every step a path may take
        layers = [self._layer_of(position) for position in positions]
        pairs: dict[Any, str] = {}
        for i, source in enumerate(layers):  # any earlier step can precede any later one
            for target in layers[i + 1 :]:
                if (source, target) not in pairs:
                    pairs[(source, target)] = f"scale.{source[0]}.{source[1]}->{target[0]}.{target[1]}"
        return pairs

    def _scale_gene(self, previous: Position | None, position: Position) -> str | None:
        """The gene scaling the stream that enters `position` from `previous` (None: unscaled)."""
        if previous is None or not self._scale_genes:
            return None
        if self.spec.scale == "per_slot":
            return self._scale_genes[position]
        return self._scale_genes[(self._layer_of(previous), self._layer_of(position))]

    def distributions(self) -> dict[str, Any]:
        """optuna distributions of every gene, in a stable order: the use genes, then the scales."""
        from optuna.distributions import FloatDistribution

        genes: dict[str, Any] = {slot.use_gene: FloatDistribution(0.0, 1.0) for slot in self.slots}
        for name in self._scale_genes.values():
            genes[name] = FloatDistribution(*self.spec.scale_range)
        return genes

    def suggest(self, trial) -> dict[str, Any]:
        """Ask an optuna trial for every gene (optuna records them as the trial's params)."""
        return {
            name: trial.suggest_float(name, distribution.low, distribution.high)
            for name, distribution in self.distributions().items()
        }

    # -- decoding -------------------------------------------------------------------------------
    def _check_depth(self, depth: int) -> None:
        if depth == 0:
            raise InvalidPathError(f"the path is empty: no slot's use gene is {self.use_threshold:g} or more")
        if depth < self.spec.min_depth:
            raise InvalidPathError(f"the path has {depth} steps, fewer than genome.min_depth {self.spec.min_depth}")
        if depth > self.max_depth:
            raise InvalidPathError(f"the path has {depth} steps, more than genome.max_depth {self.max_depth}")

    def path(self, params: Mapping[str, Any]) -> LayerPath:
        """The layer path of one trial's genes; InvalidPathError when it breaks the depth limits."""
        on = [slot for slot in self.slots if float(params[slot.use_gene]) >= self.use_threshold]
        positions = self._with_ends(on)
        self._check_depth(len(positions))
        steps = []
        previous: Position | None = None
        for position in positions:
            gene = self._scale_gene(previous, position)
            model, layer = self._layer_of(position)
            steps.append(PathStep(model=model, layer=layer, scale=float(params[gene]) if gene else 1.0))
            previous = position
        return LayerPath(steps=tuple(steps), embed_from=self.anchor, head_from=self.anchor)

    def plan(self, params: Mapping[str, Any], *, seed: int | None = None, metadata: Mapping[str, Any] | None = None):
        raise EvomergeError(
            "a dataflow genome merges no weights: its candidates are built from genome.path(params) "
            "by the path builder in evomerge.dataflow"
        )

    # -- seeds for the study --------------------------------------------------------------------
    def parent_params(self, model: str) -> dict[str, Any] | None:
        """Genes whose path is `model`'s own layers in order, every scale 1 (None: not expressible).

        Expressible when the model's layers are slots and, with fix_ends, the model is the anchor
        (whose first and last layers are the fixed ends). The embeddings and head stay the
        anchor's, so for a model other than the anchor this is its layer stack on the anchor's
        embeddings and head.
        """
        if model not in self.layer_counts:  # neither eligible nor the anchor
            return None
        layers = [(model, index) for index in range(self.layer_counts[model])]
        if self.fixed:
            if model != self.anchor:
                return None
            layers = [layer for layer in layers if layer not in self.fixed.values()]
        first_repeat = {(slot.model, slot.layer): slot for slot in self.slots[: len(self.slots) // self.spec.repeats]}
        if any(layer not in first_repeat for layer in layers):
            return None
        if not self.spec.min_depth <= len(layers) + len(self.fixed) <= self.max_depth:
            return None
        low, high = self.spec.scale_range
        if self._scale_genes and not low <= 1.0 <= high:
            return None
        on = {first_repeat[layer].use_gene for layer in layers}
        params: dict[str, Any] = {slot.use_gene: 1.0 if slot.use_gene in on else 0.0 for slot in self.slots}
        params.update({name: 1.0 for name in self._scale_genes.values()})
        return params

    def uniform_params(self) -> dict[str, Any] | None:
        """None: a layer path has no average of the fine-tunes."""
        return None

    # -- one-line descriptions ---------------------------------------------------------------------
    def outline(self) -> str:
        stack = len(self.slots) // self.spec.repeats
        return (
            f"{len(self.distributions())} genes: {len(self.slots)} layer slots ({stack} layers x {self.spec.repeats}) "
            f"and {len(self._scale_genes)} scales; paths of {self.spec.min_depth}-{self.max_depth} steps"
        )

    def describe(self, params: Mapping[str, Any]) -> str:
        """The path in one line, runs of consecutive layers joined: "9 steps: base 0, sort 1-3, ..."."""
        try:
            path = self.path(params)
        except KeyError:  # a trial failed before all its genes were drawn
            return "path ?"
        except InvalidPathError as error:
            return f"invalid path ({error})"
        runs = _runs(path.steps)
        parts = [
            f"{steps[0].model} {steps[0].layer}-{steps[-1].layer}"
            if len(steps) > 1
            else f"{steps[0].model} {steps[0].layer}"
            for steps in runs
        ]
        scaled = sum(step.scale != 1.0 for step in path.steps)
        return f"{len(path.steps)} steps: {', '.join(parts)}" + (f" ({scaled} scaled)" if scaled else "")

    # -- mergekit YAML ----------------------------------------------------------------------------
    def to_yaml(self, params: Mapping[str, Any], *, folds: Sequence[LayerFold | None] | None = None) -> str:
        """A mergekit `passthrough` YAML of the path (evomerge.dataflow.export.path_recipe, models as folders).

        `folds`: the fold rule per step, known once the sources are loaded (the candidate builder
        and export pass it); without it a scaled step is taken to be a pre-norm layer.
        """
        from evomerge.dataflow.export import path_recipe

        path = self.path(params)
        notes = []
        merged = [name for name in path.models if name in self.trials]
        if merged:
            notes.append(
                f"{', '.join(merged)}: trials of a parameter-space study; export each (evomerge export) and put its "
                "folder in their place to run this recipe."
            )
        refs = {name: self.source_ref(name) for name in path.models}
        return path_recipe(path, dtype=self.space.dtype, folds=folds, refs=refs, notes=notes)


def _runs(steps: tuple[PathStep, ...]) -> list[list[PathStep]]:
    """Steps grouped into runs of consecutive layers of one model."""
    runs: list[list[PathStep]] = []
    for step in steps:
        previous = runs[-1][-1] if runs else None
        if previous is not None and previous.model == step.model and previous.layer + 1 == step.layer:
            runs[-1].append(step)
        else:
            runs.append([step])
    return runs
