"""mergekit's one-shot merge YAML, as frozen pydantic models.

We read and write the same format as `mergekit-yaml` so recipes move freely between the two
tools. Unknown keys are rejected (a typo such as `merge_methdo` is an error, not a silent
default), and so are duplicate keys (PyYAML would silently keep the last) and binary or
non-UTF-8 files. Parameter values are checked against their method by the planner. Parts of the
format we do not implement (`modules:`, chat templates, LoRA inputs) fail validation with a
one-line message saying so.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BeforeValidator, ValidationError, field_validator, model_validator

from evomerge.config.base import StrictModel
from evomerge.config.numbers import Integer, OptionalInteger, OptionalNumber
from evomerge.dtypes import normalize_dtype
from evomerge.errors import ConfigError
from evomerge.io.lora import split_reference

_Config = TypeVar("_Config", bound=StrictModel)

Scalar = bool | int | float | str


class ConditionalParameter(StrictModel):
    """`{filter: self_attn, value: 0.5}`: applies to tensors whose name contains `filter`."""

    filter: str | None = None
    value: Any


ParameterSetting = Scalar | list[ConditionalParameter] | list[Scalar]
_SETTING_HELP = "expected a number, a list of numbers (a gradient across layers) or a list of {filter, value} entries"


def parse_setting(value: Any) -> ParameterSetting:
    """Canonical form of one parameter value; ValueError with a one-line hint otherwise."""
    if isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, ConditionalParameter):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(e, (bool, int, float, str)) for e in value):
            return list(value)
        if all(isinstance(e, (dict, ConditionalParameter)) for e in value):
            conditions = []
            for entry in value:
                if isinstance(entry, dict):
                    unknown = set(entry) - {"filter", "value"}
                    if unknown or "value" not in entry:
                        raise ValueError(
                            f"filter entries need 'value' and an optional 'filter', got keys {sorted(entry)}"
                        )
                    entry = ConditionalParameter(filter=entry.get("filter"), value=parse_setting(entry["value"]))
                conditions.append(entry)
            return conditions
    if isinstance(value, dict) and "value" in value:
        return parse_setting([value])
    raise ValueError(f"{_SETTING_HELP}, got {value!r}")


def _parse_parameters(value: Any) -> dict[str, ParameterSetting] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError(f"expected a mapping of parameter names to values, got {value!r}")
    parsed = {}
    for name, setting in value.items():
        try:
            parsed[str(name)] = parse_setting(setting)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
    return parsed


Parameters = Annotated[dict[str, Any] | None, BeforeValidator(_parse_parameters)]


def _check_model_reference(value: str) -> str:
    split_reference(value)  # 'base+adapter' (a LoRA adapter on its base) has exactly one '+'
    return value


class InputModel(StrictModel):
    model: str
    parameters: Parameters = None

    _ref = field_validator("model")(_check_model_reference)


class InputSlice(StrictModel):
    model: str
    layer_range: tuple[Integer, Integer]
    parameters: Parameters = None

    _ref = field_validator("model")(_check_model_reference)

    @field_validator("layer_range")
    @classmethod
    def _ordered(cls, value: tuple[int, int]) -> tuple[int, int]:
        if value[0] < 0 or value[1] <= value[0]:
            raise ValueError(f"expected [start, end] with 0 <= start < end, got {list(value)}")
        return value


class OutputSlice(StrictModel):
    sources: list[InputSlice]
    base_model: str | None = None
    parameters: Parameters = None
    residual_weight: OptionalNumber = None  # parsed for compatibility; mergekit ignores it too

    @model_validator(mode="after")
    def _same_length(self) -> OutputSlice:
        if not self.sources:
            raise ValueError("a slice needs at least one source")
        lengths = {s.layer_range[1] - s.layer_range[0] for s in self.sources}
        if len(lengths) > 1:
            raise ValueError(f"all sources of a slice must span the same number of layers, got {sorted(lengths)}")
        return self


class ModelTokenSource(StrictModel):
    """`{kind: model_token, model: M, token: T}` (or `token_id: N`): the row of one token of M."""

    kind: Literal["model_token"]
    model: str
    token_id: OptionalInteger = None
    token: str | None = None

    @model_validator(mode="after")
    def _one_of(self) -> ModelTokenSource:
        if (self.token_id is None) == (self.token is None):
            raise ValueError("give exactly one of 'token' or 'token_id'")
        if self.token_id is not None and self.token_id < 0:
            raise ValueError(f"token_id must be >= 0, got {self.token_id}")
        return self


class ZeroSource(StrictModel):
    """`{kind: zero}`: an all-zero row."""

    kind: Literal["zero"]


def _token_source(value: Any) -> Any:
    """A `{kind: ...}` mapping -> its model, with the inner error as one line."""
    if not isinstance(value, dict):
        return value
    kinds = {"model_token": ModelTokenSource, "zero": ZeroSource}
    kind = value.get("kind")
    if kind not in kinds:
        raise ValueError(f"expected kind: model_token or zero, got {kind!r}")
    try:
        return kinds[kind].model_validate(value)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        message = first["msg"].removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            message = "unknown field (check the spelling)"
        raise ValueError(f"{where}: {message}" if where else message) from None


class TokenEmbedding(StrictModel):
    """Where one output token's embedding and head rows come from (`tokenizer.tokens.TOKEN`).

    `source` is a model (its row of the same token), a model's token, zero, or unset (each model
    keeps its own row); `force` uses the source even for models that have the token."""

    source: Annotated[ModelTokenSource | ZeroSource | str | None, BeforeValidator(_token_source)] = None
    force: bool = False


class TokenizerSection(StrictModel):
    """mergekit's `tokenizer:` section: the output vocabulary and how its rows are filled."""

    source: str = "union"  # union | base | a model
    tokens: dict[str, TokenEmbedding] | None = None
    pad_to_multiple_of: OptionalInteger = None

    @field_validator("pad_to_multiple_of")
    @classmethod
    def _positive(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError(f"expected a whole number >= 1, got {value}")
        return value


_PART_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}")


class DataSection(StrictModel):
    """`data:`: where the data methods (fisher, regmean) take their examples (an evomerge extension).

    `tasks` is a list of lm-eval task names every model uses, or a mapping model reference -> its
    own tasks; include paths and `cache_dir` are relative to the config file's folder. The cache
    defaults to `.evomerge-stats` beside the output folder."""

    tasks: list[str] | dict[str, list[str]]
    include_paths: list[str] = []
    examples: Integer = 256
    seed: Integer = 0
    cache_dir: str | None = None

    @field_validator("tasks")
    @classmethod
    def _some_tasks(cls, value: list[str] | dict[str, list[str]]) -> list[str] | dict[str, list[str]]:
        lists = value.values() if isinstance(value, dict) else [value]
        if not value or any(not names for names in lists):
            raise ValueError("expected at least one lm-eval task name (per model when a mapping)")
        return value

    @field_validator("examples")
    @classmethod
    def _positive(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"expected at least 1 example per model, got {value}")
        return value

    def tasks_for(self, model: str) -> list[str] | None:
        """The tasks of `model` (None when a mapping does not name it)."""
        return list(self.tasks) if isinstance(self.tasks, list) else self.tasks.get(model)


class MergeConfig(StrictModel):
    merge_method: str
    models: list[InputModel] | None = None
    slices: list[OutputSlice] | None = None
    base_model: str | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    parameters: Parameters = None
    tokenizer_source: str | None = None
    tokenizer: TokenizerSection | None = None
    # Accepted so real mergekit files parse; anything but the default is refused below.
    modules: dict[str, Any] | None = None
    chat_template: str | None = None
    name: str | None = None
    data: DataSection | None = None  # evomerge's: examples for the data methods

    @field_validator("name")
    @classmethod
    def _name_is_identifier(cls, value: str | None) -> str | None:
        """A multi-document part's name is an identifier (its folder under the intermediate
        directory), never a path: '../x' or '/abs' would write outside the output."""
        if value is not None and not _PART_NAME.fullmatch(value):
            raise ValueError(
                f"expected a name of letters, digits, '_', '-' or '.' (not starting with '.' or '-', at most 100), got {value!r}"
            )
        return value

    @field_validator("dtype", "out_dtype")
    @classmethod
    def _dtype(cls, value: str | None) -> str | None:
        return None if value is None else normalize_dtype(value)

    @field_validator("base_model")
    @classmethod
    def _base_ref(cls, value: str | None) -> str | None:
        return None if value is None else _check_model_reference(value)

    @model_validator(mode="after")
    def _shape(self) -> MergeConfig:
        if self.modules is not None:
            raise ValueError("'modules:' (multi-module architectures) is not supported yet; use 'models:' or 'slices:'")
        if self.tokenizer is not None and self.tokenizer_source is not None:
            raise ValueError("give either 'tokenizer:' or 'tokenizer_source', not both")
        if self.chat_template is not None:
            raise ValueError("'chat_template' is not supported yet; the tokenizer donor's template is copied as is")
        if (self.models is None) == (self.slices is None):
            raise ValueError("exactly one of 'models' or 'slices' is required")
        if self.models is not None and not self.models:
            raise ValueError("'models' is empty")
        if self.slices is not None and not self.slices:
            raise ValueError("'slices' is empty")
        return self

    def vocabulary_source(self) -> str | None:
        """Where the output vocabulary comes from: 'union', 'base', a model, or None (the
        donor's tokenizer is copied and every model must share one vocabulary size)."""
        return self.tokenizer.source if self.tokenizer is not None else self.tokenizer_source

    def referenced_models(self) -> list[str]:
        """Every model reference, in first-appearance order (base last if not listed)."""
        refs: list[str] = []
        if self.models:
            refs.extend(m.model for m in self.models)
        for out_slice in self.slices or ():
            refs.extend(s.model for s in out_slice.sources)
            if out_slice.base_model:
                refs.append(out_slice.base_model)
        if self.base_model:
            refs.append(self.base_model)
        return list(dict.fromkeys(refs))


def format_validation_error(exc: ValidationError, file: object, *, tags: Collection[str] = ()) -> ConfigError:
    """The first pydantic error as one line: `file: field.path: message`.

    `tags` are the names of tagged-union members, which pydantic puts in the location but a user
    never writes (a space file's `genome.kind`).
    """
    errors = exc.errors()
    # An unknown key usually explains a "missing" one (a typo), so report it first.
    first = min(errors, key=lambda e: e["type"] != "extra_forbidden")
    location = ".".join(str(part) for part in first["loc"] if part not in tags)
    inner_field = (first.get("ctx") or {}).get(
        "evomerge_field"
    )  # a union's error may name the key that picks the member
    if inner_field:
        location = f"{location}.{inner_field}" if location else str(inner_field)
    message = first["msg"]
    if first["type"] == "extra_forbidden":
        message = "unknown field (check the spelling)"
    elif first["type"] == "missing":
        message = "field required"
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    return ConfigError(message, file=file, field=location or None)


def read_config_text(path: Path) -> str:
    """The file's text; one-line errors for a missing, unreadable, binary or undecodable file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError("file not found", file=path) from None
    except IsADirectoryError:
        raise ConfigError("is a directory, expected a YAML file", file=path) from None
    except OSError as exc:
        raise ConfigError(f"cannot read the file ({exc.strerror or exc})", file=path) from None
    if b"\x00" in data:
        raise ConfigError("is a binary file, expected a YAML text file", file=path)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"is not UTF-8 text (byte {exc.start}), expected a YAML text file", file=path) from None


def _yaml_error(exc: yaml.YAMLError, path: object) -> ConfigError:
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return ConfigError(f"{where}invalid YAML ({problem})", file=path)


class _DuplicateKey(yaml.MarkedYAMLError):
    """A mapping names the same key twice (YAML says keys are unique; PyYAML keeps the last)."""


class _StrictLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """safe_load that refuses duplicate keys instead of silently keeping the last value."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                continue  # SafeLoader reports unhashable keys itself
            if key in seen:
                raise _DuplicateKey(
                    None, None, f"duplicate key '{key}' (first on line {seen[key].line + 1})", key_node.start_mark
                )
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


_StrictLoader.add_constructor("tag:yaml.org,2002:map", _StrictLoader.construct_mapping)


def parse_yaml(text: str, source: object, *, documents: bool = False) -> Any:
    """Parse YAML text (all documents when `documents`), refusing duplicate keys; one-line errors."""
    try:
        if documents:
            return list(yaml.load_all(text, Loader=_StrictLoader))  # noqa: S506 - a safe loader
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a safe loader
    except yaml.YAMLError as exc:
        raise _yaml_error(exc, source) from None
    except RecursionError:
        raise ConfigError("invalid YAML (nested too deeply)", file=source) from None


def load_yaml_file(path: Path) -> Any:
    """Read and parse a YAML file, with one-line errors (see `read_config_text` and `parse_yaml`)."""
    return parse_yaml(read_config_text(path), path)


def load_yaml_documents(path: Path) -> list[Any]:
    """Every non-empty YAML document of a file (a mergekit-multi recipe has several)."""
    return [doc for doc in parse_yaml(read_config_text(path), path, documents=True) if doc is not None]


def load_config_file(path: Path, model: type[_Config], expected: str) -> _Config:
    """A one-document YAML file validated as `model`: not a mapping (`expected` says what it should
    hold) or a bad field is one ConfigError naming the file and the field."""
    data = load_yaml_file(path)
    if not isinstance(data, dict):
        raise ConfigError(f"expected {expected}", file=path)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise format_validation_error(exc, path) from None


def load_merge_config(path: Path) -> MergeConfig:
    return load_config_file(path, MergeConfig, "a mapping with merge_method and models or slices")


def load_merge_documents(path: Path) -> list[MergeConfig]:
    """One config, or a mergekit-multi file: several documents, each named but the final one.

    Later documents may use an earlier document's `name` as a model reference.
    """
    raw = load_yaml_documents(path)
    if len(raw) <= 1:
        return [load_merge_config(path)]
    configs: list[MergeConfig] = []
    names: set[str] = set()
    for index, data in enumerate(raw):
        where = f"document {index + 1}"
        if not isinstance(data, dict):
            raise ConfigError("expected a mapping with merge_method and models or slices", file=path, field=where)
        try:
            config = MergeConfig.model_validate(data)
        except ValidationError as exc:
            error = format_validation_error(exc, path)
            raise ConfigError(str(error).removeprefix(f"{path}: "), file=path, field=where) from None
        if config.name is None and index != len(raw) - 1:
            raise ConfigError("every document but the last needs a 'name'", file=path, field=where)
        if config.name is not None and index == len(raw) - 1:
            raise ConfigError(
                f"the last document is the output: leave it unnamed (it is named '{config.name}')",
                file=path,
                field=where,
            )
        if config.name in names:
            raise ConfigError(f"name '{config.name}' is used twice", file=path, field=where)
        if config.name:
            names.add(config.name)
        configs.append(config)
    return configs


def dump_merge_config(config: MergeConfig) -> str:
    """YAML text for a config, in mergekit's style (number lists in flow style)."""
    data = config.model_dump(mode="json", exclude_none=True)
    return dump_yaml(data)


# libyaml's emitter when PyYAML has it (C; the search writes a recipe every trial), the
# pure-Python one otherwise: both write the same text (tests/test_genome.py compares them).
class _FlowListDumper(getattr(yaml, "CSafeDumper", yaml.SafeDumper)):  # type: ignore[misc]
    pass


class _PyFlowListDumper(yaml.SafeDumper):
    pass


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.SequenceNode:
    flow = all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


for _dumper in (_FlowListDumper, _PyFlowListDumper):
    _dumper.add_representer(list, _represent_list)
    _dumper.add_representer(tuple, _represent_list)


def dump_yaml(data: Any) -> str:
    return yaml.dump(data, Dumper=_FlowListDumper, sort_keys=False)
