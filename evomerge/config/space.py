"""The search space file (`space.yml`): models, genome, objectives, evaluation and search settings.

Validated entirely at load time: a typo, an out-of-order range, an unknown method or sampler, or
a missing model directory is a one-line error naming the field, before any model is read.
Relative paths resolve against the space file's folder, so a space file and its tasks travel
together.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from evomerge.config.base import StrictModel
from evomerge.config.fidelity import BOUNDED_METRICS, FidelitySpec, item_bounds
from evomerge.config.mergekit_yaml import (
    DataSection,
    TokenizerSection,
    format_validation_error,
    parse_yaml,
    read_config_text,
)
from evomerge.config.numbers import (
    Integer,
    Number,
    OptionalInteger,
    OptionalNumber,
    coerce_number,
)
from evomerge.dtypes import normalize_dtype
from evomerge.errors import ConfigError, EvomergeError
from evomerge.genome.kinds import GenomeSpecField, default_genome_spec, genome_tags
from evomerge.genome.spec import GeneRange, GenomeSpec  # noqa: F401  (the parameters genome's spec, re-exported)
from evomerge.io.lora import AdapterRef, ModelSource, adapter_base, is_adapter_dir, split_reference
from evomerge.merge.registry import get_method
from evomerge.search.samplers import FACTORIES as SAMPLER_FACTORIES
from evomerge.suggest import did_you_mean

MAX_SEED = 2**32 - 1  # numpy's seed range, which optuna's samplers and lm-eval use
MIN_MAX_LENGTH = 2  # eval.max_length: lm-eval keeps max_length - 1 context tokens per request


class ModelRef(StrictModel):
    """`name@path` or a plain path (the name is then the folder name); the path may be mergekit's
    `base+adapter` or a LoRA adapter folder alone (its base: the one its adapter_config.json names
    when that is a local folder, else the space's base_model)."""

    name: str
    path: Path  # the model folder; for a LoRA adapter, its base's
    adapter: Path | None = None  # a PEFT LoRA adapter folder applied to `path`

    @property
    def source(self) -> ModelSource:
        """What a genome opens: the folder, or (base, adapter)."""
        return self.path if self.adapter is None else AdapterRef(self.path, self.adapter)

    @classmethod
    def parse(cls, value: Any, base_dir: Path, default_base: Path | None = None) -> ModelRef:
        """`default_base`: the base of an adapter given alone whose config names no local folder."""
        if isinstance(value, ModelRef):
            return value
        if isinstance(value, dict):
            if set(value) - {"name", "path"} or not isinstance(value.get("path"), str):
                raise ValueError(f"expected 'name@path', a path, or {{name, path}}, got {value!r}")
            value = f"{value.get('name') or Path(value['path']).name}@{value['path']}"
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"expected 'name@path' or a path, got {value!r}")
        name, sep, path = value.partition("@")
        if not sep:
            name, path = Path(value).name, value
        if not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
            raise ValueError(f"model name {name!r} may only use letters, digits, '_', '-' and '.'")
        parts = split_reference(path, root=base_dir)
        if parts is not None:
            base, adapter = ((base_dir / Path(part).expanduser()).resolve() for part in parts)
            return cls(name=name, path=base, adapter=adapter)
        folder = (base_dir / Path(path).expanduser()).resolve()
        if is_adapter_dir(folder):
            try:
                base = adapter_base(folder, default_base, hint=", or set base_model")
            except EvomergeError as exc:
                raise ValueError(str(exc)) from None
            return cls(name=name, path=base, adapter=folder)
        return cls(name=name, path=folder)


class Objective(StrictModel):
    task: str
    metric: str = "acc,none"
    direction: Literal["maximize", "minimize"] = "maximize"
    weight: Number = 1.0
    selection_task: str | None = None  # held-out task scored on finalists only
    name: str | None = None  # display name (default: the task name)

    @property
    def label(self) -> str:
        return self.name or self.task


class EstimatorSpec(StrictModel):
    """`eval.estimator`: score trials on a few anchor items per task and estimate the full-set score
    (evomerge.evaluate.estimator); the front is re-scored on full sets before anything is called best."""

    kind: Literal["irt"] = "irt"
    anchors: Integer = Field(20, ge=1)  # anchor items per task
    calibration: Integer = Field(20, ge=0)  # space-filling merges scored on every item, beside the references
    method: Literal["anchor", "p_irt", "gp_irt"] = "gp_irt"
    cluster_on: Literal["responses", "irt"] = "responses"  # what k-means groups items by
    check: Integer = Field(5, ge=0)  # random estimated trials also re-scored in full, for the fidelity report


class EvalSpec(StrictModel):
    kind: str = "lm_eval"  # which evaluator scores the objectives (evomerge.evaluate.factory.EVALUATORS)
    include_paths: list[Path] = Field(default_factory=list)
    limit: int | float | None = None  # items per task (a whole number), or a fraction in (0, 1)
    selection_limit: int | float | None = None
    num_fewshot: OptionalInteger = Field(None, ge=0)
    batch_size: Integer = Field(32, ge=1)
    max_length: OptionalInteger = Field(None, ge=MIN_MAX_LENGTH)
    seed: Integer = Field(1234, ge=0, le=MAX_SEED)
    apply_chat_template: bool = False
    model_args: dict[str, Any] = Field(default_factory=dict)
    # lm_eval kind: build and tokenise the requests once per worker, per candidate only run the
    # model and lm-eval's scoring (evomerge.evaluate.request_cache); false: lm-eval's evaluate per call
    request_cache: bool = True
    estimator: EstimatorSpec | None = None  # None: every trial is scored on every item
    fidelity: FidelitySpec | None = None  # successive halving over item budgets (None: every item, every trial)

    @field_validator("limit", "selection_limit", mode="before")
    @classmethod
    def _limit(cls, value: Any) -> int | float | None:
        if value is None:
            return None
        number = coerce_number(value)
        if 0 < number < 1:
            return number
        if number >= 1 and number.is_integer():
            return int(number)
        raise ValueError(f"expected a whole number of items (>= 1) or a fraction in (0, 1), got {value!r}")

    @model_validator(mode="after")
    def _one_cheap_fitness(self) -> EvalSpec:
        if self.estimator is not None and self.fidelity is not None:
            raise ValueError("set eval.fidelity or eval.estimator, not both (each decides which items a trial sees)")
        return self


class SearchSpec(StrictModel):
    sampler: str = "tpe"
    seed: Integer = Field(0, ge=0, le=MAX_SEED)
    sampler_options: dict[str, Any] = Field(default_factory=dict)
    n_trials: OptionalInteger = Field(None, ge=1)
    timeout: OptionalNumber = Field(None, gt=0)
    study_name: str | None = None
    storage: str | None = None
    enqueue: list[Literal["parents", "uniform"]] = Field(default_factory=lambda: ["parents", "uniform"])
    finalists: Integer = Field(5, ge=0, description="front members re-scored on the selection split")
    workers: Integer = Field(1, ge=1)
    merge_seed: Integer = Field(0, ge=0)  # DARE/DELLA mask seed, shared by every trial (common random numbers)

    @field_validator("sampler")
    @classmethod
    def _sampler(cls, value: str) -> str:
        if value not in SAMPLER_FACTORIES:  # the sampler table, so a sampler added there is accepted here
            names = tuple(SAMPLER_FACTORIES)
            raise ValueError(f"unknown sampler '{value}' (choose from: {', '.join(names)}){did_you_mean(value, names)}")
        return value

    @model_validator(mode="after")
    def _budget(self) -> SearchSpec:
        if self.n_trials is None and self.timeout is None:
            raise ValueError("set n_trials and/or timeout (seconds) so the search ends")
        return self


class RaySpec(StrictModel):
    """Where worker actors run when search.workers > 1 (or ray.address is set)."""

    address: str | None = (
        None  # an existing cluster ("host:6379" or "auto"; the driver runs on a node); else RAY_ADDRESS; else local
    )
    num_cpus_per_worker: Number = Field(1.0, gt=0)
    num_gpus_per_worker: OptionalNumber = Field(None, ge=0)  # default: 1 when device is cuda, else 0
    max_restarts: Integer = Field(3, ge=0)  # a dead actor (killed, out of memory) is restarted this many times
    namespace: str = "evomerge"


class SearchSpace(StrictModel):
    models: list[ModelRef]
    base_model: ModelRef | None = None
    dtype: str = "float32"
    device: str = "auto"
    trust_remote_code: bool = False
    allow_pickle: bool = False
    # Differing vocabularies, as in a mergekit config (models named by their names here).
    tokenizer_source: str | None = None
    tokenizer: TokenizerSection | None = None
    # LoRA sources in a search: keep the factors and compute each adapted tensor per candidate
    # ("factors", least memory), or compute them once at load ("cached", a full tensor each).
    adapter_deltas: Literal["factors", "cached"] = "factors"
    genome: GenomeSpecField = Field(default_factory=default_genome_spec)
    objectives: list[Objective]
    # The data methods' (fisher, regmean) examples; None: every fine-tune uses the objectives'
    # tasks and eval.include_paths (data_section). Paths are relative to the space file's folder.
    data: DataSection | None = None
    eval: EvalSpec = Field(default_factory=EvalSpec)
    search: SearchSpec
    ray: RaySpec = Field(default_factory=RaySpec)
    # set by load_space, not by users
    source_path: Path | None = Field(None, exclude=True)
    source_text: str = Field("", exclude=True)

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, value: str) -> str:
        return normalize_dtype(value)

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
            raise ValueError(f"expected auto, cpu, cuda or cuda:N, got {value!r}")
        return value

    @field_validator("objectives")
    @classmethod
    def _objectives(cls, value: list[Objective]) -> list[Objective]:
        if not value:
            raise ValueError("list at least one objective (an lm-eval task and metric)")
        labels = [o.label for o in value]
        if len(set(labels)) != len(labels):
            raise ValueError(f"objective names must be unique, got {labels} (set 'name:' to tell them apart)")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> SearchSpace:
        names = [m.name for m in self.models] + ([self.base_model.name] if self.base_model else [])
        if len(set(names)) != len(names):
            raise ValueError(f"model names must be unique, got {names} (use name@path)")
        if not self.models:
            raise ValueError("models: list at least one fine-tune")
        needs_base = [m for m in self.genome.merge_methods() if get_method(m).base != "unused"]
        if needs_base and self.base_model is None:
            raise ValueError(f"base_model is required by {', '.join(needs_base)}")
        self._check_vocabulary(names)
        self._check_data()
        self._check_fidelity()
        if self.search.sampler == "cmaes" and len(self.objectives) > 1 and not any(o.weight for o in self.objectives):
            raise ValueError("cmaes optimises the weighted sum of objectives: give at least one a non-zero weight")
        return self

    def _check_fidelity(self) -> None:
        spec = self.eval.fidelity
        if spec is None:
            return
        if spec.cap:
            unbounded = [o.label for o in self.objectives if item_bounds(o.metric) is None]
            if unbounded:
                raise ValueError(
                    f"eval.fidelity.cap needs each item's best possible value, which objective '{unbounded[0]}' "
                    f"does not have (known: {', '.join(BOUNDED_METRICS)}): drop cap"
                )
        if spec.pruner == "evomerge":
            return
        for rule in ("race", "cap"):
            if getattr(spec, rule):
                raise ValueError(
                    f"eval.fidelity.{rule} is evomerge's rule; optuna's {spec.pruner} pruner decides alone: "
                    "drop one of them"
                )
        if self.multi_objective:
            raise ValueError(
                f"eval.fidelity.pruner: optuna's {spec.pruner} pruner takes a single-objective study (one "
                f"objective, or sampler cmaes over their weighted sum), this one has {len(self.objectives)} "
                "objectives: use pruner: evomerge"
            )
        if "promote_by" in spec.model_fields_set:
            raise ValueError(
                f"eval.fidelity.promote_by is evomerge's rule; optuna's {spec.pruner} pruner ranks by the study's "
                "one value: drop one of them"
            )
        if spec.pruner != "wilcoxon" and not float(spec.eta).is_integer():
            raise ValueError(f"eval.fidelity.eta: optuna's {spec.pruner} pruner takes a whole number, got {spec.eta:g}")
        if "p_threshold" in spec.model_fields_set and spec.pruner != "wilcoxon":
            raise ValueError(f"eval.fidelity.p_threshold is the wilcoxon pruner's, not {spec.pruner}'s")

    def data_methods(self) -> list[str]:
        """The genome's methods that merge by statistics of data (fisher, regmean)."""
        methods = getattr(self.genome, "merge_methods", lambda: [])()
        return [m for m in methods if get_method(m).statistic is not None]

    def _check_data(self) -> None:
        data_methods = self.data_methods()
        if len(data_methods) > 1:  # a plan holds one statistics file per model
            raise ValueError(f"genome.methods: list at most one data method, got {', '.join(data_methods)}")
        if data_methods and self.data is not None and isinstance(self.data.tasks, dict):
            missing = [m.name for m in self.models if not self.data.tasks_for(m.name)]
            if missing:
                raise ValueError(f"data.tasks: no tasks for model '{missing[0]}' (needed by {data_methods[0]})")

    def data_section(self) -> DataSection | None:
        """The data methods' data: the `data:` section, else every objective's search task for
        every fine-tune with eval.include_paths (None when the genome has no data method)."""
        if not self.data_methods():
            return None
        if self.data is not None:
            return self.data
        tasks = list(dict.fromkeys(o.task for o in self.objectives))
        return DataSection(tasks=tasks, include_paths=[str(p) for p in self.eval.include_paths])

    def _check_vocabulary(self, names: list[str]) -> None:
        if self.tokenizer is not None and self.tokenizer_source is not None:
            raise ValueError("give either 'tokenizer:' or 'tokenizer_source', not both")
        kind = getattr(self.genome, "kind", "parameters")
        if self.vocabulary_source() is not None and kind != "parameters":
            raise ValueError(
                f"a tokenizer source (differing vocabularies) works with genome kind 'parameters', not '{kind}'"
            )
        refs = []
        if self.vocabulary_source() not in (None, "base", "union"):
            refs.append(("tokenizer" if self.tokenizer else "tokenizer_source", self.vocabulary_source()))
        for token, entry in (self.tokenizer.tokens or {}).items() if self.tokenizer else ():
            model = entry.source if isinstance(entry.source, str) else getattr(entry.source, "model", None)
            if model is not None:
                refs.append((f"tokenizer.tokens.{token}", model))
        for where, ref in refs:
            if ref not in names:
                raise ValueError(f"{where}: '{ref}' is not a model of this space (models: {', '.join(names)})")

    def vocabulary_source(self) -> str | None:
        """'union', 'base', a model name, or None (every model shares one vocabulary)."""
        return self.tokenizer.source if self.tokenizer is not None else self.tokenizer_source

    # -- derived facts ------------------------------------------------------------------------
    @property
    def study_name(self) -> str:
        if self.search.study_name:
            return self.search.study_name
        stem = self.source_path.stem if self.source_path else "evomerge"
        return stem

    @property
    def storage_url(self) -> str:
        """The study database. Relative SQLite paths resolve against the space file's folder."""
        folder = self.source_path.parent if self.source_path else Path.cwd()
        url = self.search.storage
        if not url:
            return f"sqlite:///{(folder / f'{self.study_name}.db').resolve()}"
        prefix = "sqlite:///"
        if (
            url.startswith(prefix)
            and not url[len(prefix) :].startswith("/")
            and url[len(prefix) :] not in ("", ":memory:")
        ):
            return f"{prefix}{(folder / url[len(prefix) :]).resolve()}"
        return url

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1 and self.search.sampler != "cmaes"

    @property
    def directions(self) -> list[str]:
        return [o.direction for o in self.objectives] if self.multi_objective else ["maximize"]

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.source_text.encode()).hexdigest()[:12]


_MODEL_FIELDS = ("models", "base_model")


def parse_space(
    data: Any, *, base_dir: Path, source: object = "space", text: str = "", check_paths: bool = True
) -> SearchSpace:
    if not isinstance(data, dict):
        raise ConfigError("expected a mapping with models, objectives and search", file=source)
    data = dict(data)
    try:
        if data.get("base_model") is not None:  # first: an adapter given alone may need it
            try:
                data["base_model"] = ModelRef.parse(data["base_model"], base_dir)
            except (ValueError, KeyError) as exc:
                raise ConfigError(str(exc), file=source, field="base_model") from None
            if data["base_model"].adapter is not None:
                raise ConfigError(
                    "expected a full model folder (a LoRA adapter cannot be the base; list it under models)",
                    file=source,
                    field="base_model",
                )
        if "models" in data:
            if not isinstance(data["models"], list):
                raise ConfigError("expected a list of 'name@path' entries", file=source, field="models")
            models = []
            default_base = data["base_model"].path if isinstance(data.get("base_model"), ModelRef) else None
            for i, entry in enumerate(data["models"]):
                try:
                    models.append(ModelRef.parse(entry, base_dir, default_base))
                except (ValueError, KeyError) as exc:
                    raise ConfigError(str(exc), file=source, field=f"models.{i}") from None
            data["models"] = models
        evaluation = data.get("eval")
        if isinstance(evaluation, dict) and isinstance(evaluation.get("include_paths"), list):
            evaluation = dict(evaluation)
            evaluation["include_paths"] = [(base_dir / str(p)).resolve() for p in evaluation["include_paths"]]
            data["eval"] = evaluation
        section = data.get("data")
        if isinstance(section, dict):  # absolute, so recipes and workers elsewhere find them
            section = dict(section)
            if isinstance(section.get("include_paths"), list):
                section["include_paths"] = [str((base_dir / str(p)).resolve()) for p in section["include_paths"]]
            if isinstance(section.get("cache_dir"), str):
                section["cache_dir"] = str((base_dir / section["cache_dir"]).resolve())
            data["data"] = section
        space = SearchSpace.model_validate(data)
    except ValidationError as exc:
        raise format_validation_error(exc, source, tags=genome_tags()) from None
    if space.eval.estimator is not None:
        check_estimator(space, source)
    if not check_paths:
        return space.model_copy(update={"source_text": text})
    for i, model in enumerate(space.models):
        if not model.path.is_dir():
            raise ConfigError(f"model directory {model.path} does not exist", file=source, field=f"models.{i}")
        if model.adapter is not None and not is_adapter_dir(model.adapter):
            raise ConfigError(
                f"{model.adapter} is not a PEFT adapter folder (expected adapter_config.json, no config.json)",
                file=source,
                field=f"models.{i}",
            )
    if space.base_model and not space.base_model.path.is_dir():
        raise ConfigError(f"model directory {space.base_model.path} does not exist", file=source, field="base_model")
    for i, path in enumerate(space.eval.include_paths):
        if not path.exists():
            raise ConfigError(f"{path} does not exist", file=source, field=f"eval.include_paths.{i}")
        if not path.is_dir():
            raise ConfigError(
                f"{path} is not a folder (expected a folder of lm-eval task YAMLs)",
                file=source,
                field=f"eval.include_paths.{i}",
            )
    for i, folder in enumerate(space.data.include_paths if space.data else ()):
        if not Path(folder).is_dir():
            raise ConfigError(
                f"{folder} is not a folder of lm-eval task YAMLs", file=source, field=f"data.include_paths.{i}"
            )
    return space.model_copy(update={"source_text": text})


def check_estimator(space: SearchSpace, source: object) -> None:
    """The IRT estimator models 0/1 items: each objective a binary per-item metric, one metric per task."""
    from evomerge.evaluate.estimator import BINARY_METRICS, is_binary_metric

    seen: dict[str, str] = {}
    for i, objective in enumerate(space.objectives):
        if not is_binary_metric(objective.metric):
            raise ConfigError(
                f"eval.estimator needs a binary per-item metric ({', '.join(sorted(BINARY_METRICS))}), "
                f"got '{objective.metric}'",
                file=source,
                field=f"objectives.{i}.metric",
            )
        if seen.setdefault(objective.task, objective.metric) != objective.metric:
            raise ConfigError(
                f"eval.estimator fits one metric per task; task '{objective.task}' has two",
                file=source,
                field=f"objectives.{i}.metric",
            )


def is_space_file(data: Any) -> bool:
    return isinstance(data, dict) and ("objectives" in data or "search" in data) and "merge_method" not in data


def load_space(path: Path, *, check_paths: bool = True) -> SearchSpace:
    """Load and validate a space file; check_paths=False validates a space whose models live elsewhere."""
    path = Path(path)
    text = read_config_text(path)
    space = parse_space(
        parse_yaml(text, path), base_dir=path.parent.resolve(), source=path, text=text, check_paths=check_paths
    )
    return space.model_copy(update={"source_path": path.resolve()})
