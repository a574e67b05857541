"""The `parameters` genome: per-layer-group merge methods and parameters, as optuna genes.

The genome is a *static* set of named parameters (every trial suggests all of them), which is
what CMA-ES and NSGA-II need. Layers are cut into contiguous groups (`layer_granularity`); each
group has a method gene (or one method for the whole model) and, per tensor filter set, one
weight / density / gamma / epsilon gene per fine-tune plus t and lambda genes. Embeddings and
the final norm + lm_head have gene sets of their own. Names read like `g1.mlp.add.weight`, so
a trial is legible in optuna-dashboard.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from evomerge.config.mergekit_yaml import dump_yaml
from evomerge.config.space import SearchSpace
from evomerge.dtypes import torch_dtype
from evomerge.errors import CompatibilityError, ConfigError
from evomerge.io.lora import AdapterModel, open_models
from evomerge.io.model_dir import ModelDir
from evomerge.merge.layout import LayerLayout, model_layout
from evomerge.merge.plan import MergePlan, TensorRecipe
from evomerge.merge.planner import describe_name_difference, shape_mismatch_hint
from evomerge.merge.registry import SeedRule, gene_params, get_method, ranked
from evomerge.merge.vocab import Vocabulary, build_vocabulary, config_vocab_size, is_vocab_tensor

CATCH_ALL = "all"


@dataclass(frozen=True)
class Block:
    """A set of tensors that share genes: a layer group, the embeddings or the head."""

    name: str  # "g0", "g1", ..., "emb", "head"
    method_gene: str | None  # the gene holding this block's method (None: fixed)


class ParameterGenome:
    """Genome kind `parameters` (see evomerge.genome.protocol.Genome for what callers use)."""

    def __init__(self, space: SearchSpace, models: Mapping[str, ModelDir | AdapterModel] | None = None):
        self.space = space
        spec = space.genome
        self.finetunes = [m.name for m in space.models]
        self.base = space.base_model.name if space.base_model else None
        paths = {m.name: m.source for m in space.models}  # a LoRA adapter: (base, adapter)
        if space.base_model:
            paths[space.base_model.name] = space.base_model.source
        self.paths = paths
        self.models = dict(models) if models else open_models(paths, allow_pickle=space.allow_pickle)
        donor = self.base or self.finetunes[0]
        self.layout: LayerLayout = model_layout(self.models[donor])
        self.vocab = self._vocabulary()
        self._check_compatible()
        layers = self.layout.num_layers
        granularity = spec.layer_granularity or layers or 1
        if layers and layers % granularity:
            raise ConfigError(
                f"{granularity} does not divide the {layers} layers of the models",
                file=space.source_path,
                field="genome.layer_granularity",
            )
        self.granularity = granularity
        self.num_groups = max(1, layers // granularity) if layers else 1
        self.filter_sets = [f for f in spec.filters] + [CATCH_ALL]
        self.methods = list(spec.methods)
        # The data method's statistics files by fine-tune (load_statistics; empty: none loaded yet).
        self.statistics: dict[str, Path] = {}
        if len(self.methods) == 1:
            method_gene = lambda block: None  # noqa: E731
        elif spec.method_per_group:
            method_gene = lambda block: f"{block}.method"  # noqa: E731
        else:
            method_gene = lambda block: "method"  # noqa: E731
        self.blocks = [Block(f"g{i}", method_gene(f"g{i}")) for i in range(self.num_groups)]
        self._method_of_block = {b.name: b.method_gene for b in self.blocks}
        if spec.embeddings:
            self._method_of_block["emb"] = self.blocks[0].method_gene
        if spec.head:
            self._method_of_block["head"] = self.blocks[-1].method_gene
        self._per_model = sorted({p for m in self.methods for p in get_method(m).genes("model")})
        self._global = sorted({p for m in self.methods for p in get_method(m).genes("global")})

    # -- the search space ---------------------------------------------------------------------
    def _gene_sets(self) -> list[tuple[str, str]]:
        """(block, filter set) pairs that carry their own parameter genes."""
        sets = [(b.name, f) for b in self.blocks for f in self.filter_sets]
        if self.space.genome.embeddings:
            sets.append(("emb", CATCH_ALL))
        if self.space.genome.head:
            sets.append(("head", CATCH_ALL))
        return sets

    def distributions(self) -> dict[str, Any]:
        """optuna distributions of every gene, in a stable order."""
        from optuna.distributions import CategoricalDistribution, FloatDistribution

        genes: dict[str, Any] = {}
        for gene in dict.fromkeys(g for g in self._method_of_block.values() if g):
            genes[gene] = CategoricalDistribution(self.methods)
        for block, filt in self._gene_sets():
            for param in self._per_model:
                bounds = self.space.genome.gene_range(param)
                if isinstance(bounds, tuple):
                    for model in self.finetunes:
                        genes[f"{block}.{filt}.{model}.{param}"] = FloatDistribution(*bounds)
            for param in self._global:
                bounds = self.space.genome.gene_range(param)
                if isinstance(bounds, tuple):
                    genes[f"{block}.{filt}.{param}"] = FloatDistribution(*bounds)
        return genes

    def suggest(self, trial) -> dict[str, Any]:
        """Ask an optuna trial for every gene (optuna records them as the trial's params)."""
        params = {}
        for name, distribution in self.distributions().items():
            if hasattr(distribution, "choices"):
                params[name] = trial.suggest_categorical(name, distribution.choices)
            else:
                params[name] = trial.suggest_float(name, distribution.low, distribution.high)
        return params

    # -- seeds for the study --------------------------------------------------------------------
    def _preferred_method(self, rank: str) -> str | None:
        """The first of this genome's methods in the catalogue's `rank` order (parent/uniform)."""
        return next((m for m in ranked(rank) if m in self.methods), None)

    def _clip(self, name: str, value: float) -> float:
        bounds = self.space.genome.gene_range(name)
        return min(max(value, bounds[0]), bounds[1]) if isinstance(bounds, tuple) else value

    def _seed_value(self, rule: SeedRule | None, model: str | None, parent: str | None, low: float) -> float:
        """A gene's value under its seed rule (registry.SeedRule; no rule: the low end)."""
        if rule == "one_hot":
            return 1.0 if model == parent else 0.0
        if rule == "share":
            return 1.0 / len(self.finetunes)
        if rule == "low" or rule is None:
            return low
        return float(rule)

    def _seed_params(self, method: str, seed: Literal["alone", "uniform"], parent: str | None = None) -> dict[str, Any]:
        """Every gene set to its Param's `seed` rule ("alone" for `parent`, or "uniform"), clipped
        to the gene's range, with `method` in every method gene."""
        genes = gene_params()
        owners = {  # per-model gene -> its fine-tune (model names may contain dots)
            f"{block}.{filt}.{model}.{gene}": model
            for block, filt in self._gene_sets()
            for model in self.finetunes
            for gene in self._per_model
        }
        params: dict[str, Any] = {}
        for name, distribution in self.distributions().items():
            if hasattr(distribution, "choices"):
                params[name] = method
                continue
            gene = name.rsplit(".", 1)[-1]
            rule = getattr(genes[gene], seed)
            params[name] = self._clip(gene, self._seed_value(rule, owners.get(name), parent, distribution.low))
        return params

    def parent_params(self, model: str) -> dict[str, Any] | None:
        """A genome that reproduces one fine-tune alone (None if the space cannot express it)."""
        method = self._preferred_method("parent_rank")
        if method is None:
            return None
        return self._seed_params(method, "alone", parent=model)

    def uniform_params(self) -> dict[str, Any] | None:
        """The plain average of the fine-tunes (a model soup)."""
        method = self._preferred_method("uniform_rank")
        if method is None:
            return None
        return self._seed_params(method, "uniform")

    # -- one-line descriptions ---------------------------------------------------------------------
    def outline(self) -> str:
        return f"{len(self.distributions())} genes over {self.num_groups} layer groups"

    def describe(self, params: Mapping[str, Any]) -> str:
        """The merge method of each layer group in one line, runs of equal groups joined.

        E.g. "layers 0-3 ties, layers 4-7 task_arithmetic, embeddings ties, head ties".
        """

        def method_of(block: str) -> str:  # "?" where a gene is missing (a trial failed before it was drawn)
            try:
                return self.method_of(params, block)
            except KeyError:
                return "?"

        runs: list[list[Any]] = []  # [first layer, last layer, method]
        for index, block in enumerate(self.blocks):
            method = method_of(block.name)
            first, last = index * self.granularity, (index + 1) * self.granularity - 1
            if runs and runs[-1][2] == method:
                runs[-1][1] = last
            else:
                runs.append([first, last, method])
        layers = self.layout.num_layers
        parts = [
            (f"layers {first}-{last} {method}" if first != last else f"layer {first} {method}")
            if layers
            else f"all tensors {method}"
            for first, last, method in runs
        ]
        if self.space.genome.embeddings:
            parts.append(f"embeddings {method_of('emb')}")
        if self.space.genome.head:
            parts.append(f"head {method_of('head')}")
        return ", ".join(parts)

    # -- decoding -------------------------------------------------------------------------------
    def _value(self, params: Mapping[str, Any], name: str, param: str) -> float:
        fixed = self.space.genome.gene_range(param)
        return float(params[name]) if isinstance(fixed, tuple) else float(fixed)

    def _block_of(self, tensor: str) -> tuple[str, int | None]:
        if tensor in self.layout.pre:
            return ("emb" if self.space.genome.embeddings else "g0"), None
        if tensor in self.layout.post:
            return ("head" if self.space.genome.head else f"g{self.num_groups - 1}"), None
        index = int(tensor[len(self.layout.prefix) + 1 :].split(".", 1)[0])
        return f"g{index // self.granularity}", index

    def _filter_of(self, block: str, tensor: str) -> str:
        if block in ("emb", "head"):
            return CATCH_ALL
        return next((f for f in self.filter_sets[:-1] if f in tensor), CATCH_ALL)

    def method_of(self, params: Mapping[str, Any], block: str) -> str:
        gene = self._method_of_block.get(block)
        return params[gene] if gene else self.methods[0]

    def block_params(
        self, params: Mapping[str, Any], block: str, filt: str
    ) -> tuple[str, dict[str, dict[str, float]], dict[str, float]]:
        """(method, per-fine-tune params, global params) of one gene set."""
        method = self.method_of(params, block)
        spec = get_method(method)
        model_names, global_names = spec.genes("model"), spec.genes("global")
        per_model = {
            model: {p: self._value(params, f"{block}.{filt}.{model}.{p}", p) for p in model_names}
            for model in self.finetunes
        }
        global_params = {p: self._value(params, f"{block}.{filt}.{p}", p) for p in global_names}
        if self.space.genome.normalize is not None and "normalize" in spec.global_params:
            global_params["normalize"] = self.space.genome.normalize
        return method, per_model, global_params

    def _sources(self, params: Mapping[str, Any], method: str, block: str) -> tuple[list[str], int | None]:
        """The models a block merges, in order, and the base's index.

        A method that does not use the base merges the fine-tunes alone. A method that `picks_by`
        a gene (slerp) takes two models: the base and the fine-tune with the largest catch-all
        value of that gene in the layer group (embeddings follow the first group, the head the
        last), because a mergekit slice has one list of sources for all its tensors.
        """
        spec = get_method(method)
        if spec.base == "unused":
            return list(self.finetunes), None
        if spec.picks_by:
            group = "g0" if block == "emb" else f"g{self.num_groups - 1}" if block == "head" else block
            _, genes, _ = self._as_method(params, group, method)
            chosen = max(self.finetunes, key=lambda m: (genes[m][spec.picks_by], -self.finetunes.index(m)))
            return [self.base, chosen], 0
        return [self.base, *self.finetunes], 0

    def plan(
        self, params: Mapping[str, Any], *, seed: int | None = None, metadata: Mapping[str, Any] | None = None
    ) -> MergePlan:
        """The MergePlan of one trial's genome."""
        donor = self.base or self.finetunes[0]
        tensors = self.models[donor].tensors
        recipes = []
        aligned: dict[str, str | None] = {}  # vocabulary-permuted tensors and their base
        # One decode per gene set, shared by its tensors' recipes (the same parameter objects, so
        # a re-merge validates each set once: fused_plan keys its cache on them).
        decoded: dict[tuple[str, str], tuple] = {}
        for tensor in self._tensor_order():
            block, _ = self._block_of(tensor)
            gene_set = (block, self._filter_of(block, tensor))
            if gene_set not in decoded:
                method, per_model, global_params = self.block_params(params, *gene_set)
                sources, base_index = self._sources(params, method, block)
                declared = get_method(method).model_params  # not a picking gene (slerp's weight)
                model_params = tuple(
                    {} if index == base_index else {p: v for p, v in per_model[name].items() if p in declared}
                    for index, name in enumerate(sources)
                )
                decoded[gene_set] = method, sources, base_index, model_params, global_params
            method, sources, base_index, model_params, global_params = decoded[gene_set]
            shape = tensors[tensor].shape
            if self._vocab_tensor(tensor):
                aligned[tensor] = sources[base_index] if base_index is not None else None
                shape = (self.vocab.size, *shape[1:])
            recipes.append(
                TensorRecipe(
                    name=tensor,
                    method=method,
                    inputs=tuple((name, tensor) for name in sources),
                    base_index=base_index,
                    model_params=model_params,
                    global_params=global_params,
                    shape=shape,
                )
            )
        dtype = torch_dtype(self.space.dtype)
        return MergePlan(
            models=dict(self.paths),
            tensors=tuple(recipes),
            math_dtype=dtype,
            out_dtype=dtype,
            config_donor=donor,
            tokenizer_donor=donor,
            num_hidden_layers=self.layout.num_layers,
            seed=self.space.search.merge_seed if seed is None else seed,
            recipe_yaml=self.to_yaml(params),
            metadata=dict(metadata or {}),
            vocab=replace(self.vocab, tensors=aligned) if self.vocab else None,
            statistics=dict(self.statistics),
        )

    def load_statistics(self, device: str = "cpu") -> None:
        """Compute (or read from the cache) the data method's statistics once, for every plan after."""
        from evomerge.data_stats.for_space import space_statistics

        self.statistics = space_statistics(self.space, self.paths, device=device)

    def _tensor_order(self) -> list[str]:
        layers = [self.layout.layer_tensor(i, s) for i, suffixes in self.layout.layers.items() for s in suffixes]
        return [*self.layout.pre, *layers, *self.layout.post]

    # -- mergekit YAML ----------------------------------------------------------------------------
    def to_yaml(self, params: Mapping[str, Any]) -> str:
        """A mergekit-compatible YAML that reproduces the plan of `params`.

        One method everywhere: a single `slices:` config (one slice per layer group, filter lists
        for the tensor sets, embedding and head genes as filters on the first/last slice).
        Several methods: a `mergekit-multi` file, one full merge per method, then a passthrough
        that takes each group's layers from the part merged with its method.
        """
        methods_used = list(dict.fromkeys(self.method_of(params, b) for b in self._all_blocks()))
        documents = []
        if len(methods_used) == 1:
            documents.append(self._config_for(params, methods_used[0], name=None))
        else:
            for method in methods_used:
                documents.append(self._config_for(params, method, name=f"part-{method}"))
            slices = []
            for index, block in enumerate(self.blocks):
                start = index * self.granularity
                part = f"part-{self.method_of(params, block.name)}"
                slices.append({"sources": [{"model": part, "layer_range": [start, start + self.granularity]}]})
            documents.append({"merge_method": "passthrough", "slices": slices, "dtype": self.space.dtype})
            # embeddings come from the first slice's part and the head from the last, which use
            # the methods of the first and last groups: the same as the plan.
        header = (
            "# Made by evomerge from a search genome. "
            + (
                "Run with mergekit-yaml or evomerge merge.\n"
                if len(documents) == 1
                else "Run with mergekit-multi or evomerge merge.\n"
            )
            + f"# DARE/DELLA masks: evomerge seed {self.space.search.merge_seed} (mergekit draws its own).\n"
            + self._vocabulary_note(documents)
        )
        return header + "---\n".join(dump_yaml(doc) for doc in documents)

    def _vocabulary_note(self, documents: list[dict]) -> str:
        """A header line when a part does not merge every model with the base as its base: its
        output vocabulary, built by mergekit from the models it names, can then differ from the
        one the trial was scored (and is exported) with, which is built from all the space's models."""
        if self.vocab is None:
            return ""
        everyone = {str(path) for path in self.paths.values()}
        base = str(self.paths[self.base]) if self.base else None
        for document in documents:
            if "tokenizer" not in document and "tokenizer_source" not in document:
                continue
            refs = {source["model"] for part in document["slices"] for source in part["sources"]}
            refs |= {document["base_model"]} if "base_model" in document else set()
            if refs != everyone or document.get("base_model") != base:
                return (
                    "# Vocabulary: a part merges only some of the models or has no base_model; mergekit builds "
                    "its vocabulary from those, the scored model (and its export) from all the space's models.\n"
                )
        return ""

    def _all_blocks(self) -> list[str]:
        names = [b.name for b in self.blocks]
        if self.space.genome.embeddings:
            names.append("emb")
        if self.space.genome.head:
            names.append("head")
        return names

    def _config_for(self, params: Mapping[str, Any], method: str, *, name: str | None) -> dict:
        """One mergekit config merging every layer with `method` (genes of each group)."""
        slices = []
        for index, block in enumerate(self.blocks):
            start = index * self.granularity
            # In a multi-part file, groups merged by another method still need valid parameters in
            # this part (their layers are not used): their genes are read as if for this method.
            extras = []
            if index == 0 and self.space.genome.embeddings:
                extras += [("emb", filt) for filt in self._outer_filters(self.layout.pre)]
            if index == len(self.blocks) - 1 and self.space.genome.head:
                extras += [("head", filt) for filt in self._outer_filters(self.layout.post)]
            sources, base_index = self._sources(params, method, block.name)
            spec = get_method(method)
            source_entries = []
            for position, model in enumerate(sources):
                entry: dict[str, Any] = {
                    "model": str(self.paths[model]),
                    "layer_range": [start, start + self.granularity],
                }
                if position != base_index:
                    entry_params = {}
                    for param in spec.genes("model"):
                        if param not in spec.model_params:
                            continue  # a gene that picks the sources (slerp's weight), not a parameter
                        conditions = []
                        for block_name, filt in extras:
                            value = self._as_method(params, block_name, method, filt=CATCH_ALL)[1][model][param]
                            conditions.append({"filter": filt, "value": value})
                        for filt in self.filter_sets:
                            value = self._as_method(params, block.name, method, filt=filt)[1][model][param]
                            conditions.append({"filter": None if filt == CATCH_ALL else filt, "value": value})
                        entry_params[param] = _collapse(conditions)
                    if entry_params:
                        entry["parameters"] = entry_params
                source_entries.append(entry)
            slice_params = {}
            for param in spec.genes("global"):
                conditions = []
                for block_name, filt in extras:
                    conditions.append({"filter": filt, "value": self._as_method(params, block_name, method)[2][param]})
                for filt in self.filter_sets:
                    value = self._as_method(params, block.name, method, filt=filt)[2][param]
                    conditions.append({"filter": None if filt == CATCH_ALL else filt, "value": value})
                slice_params[param] = _collapse(conditions)
            out_slice: dict[str, Any] = {"sources": source_entries}
            if slice_params:
                out_slice["parameters"] = slice_params
            slices.append(out_slice)
        config: dict[str, Any] = {}
        if name:
            config["name"] = name
        config["merge_method"] = method
        if get_method(method).base != "unused" and self.base:
            config["base_model"] = str(self.paths[self.base])
        config["slices"] = slices
        if self.space.genome.normalize is not None and "normalize" in get_method(method).global_params:
            config["parameters"] = {"normalize": self.space.genome.normalize}
        config["dtype"] = self.space.dtype
        config.update(self._tokenizer_yaml())
        if get_method(method).statistic is not None:
            from evomerge.data_stats.for_space import data_yaml

            config["data"] = data_yaml(self.space)
        return config

    def _tokenizer_yaml(self) -> dict[str, Any]:
        """The space's tokenizer settings with model names as paths, as a mergekit config has them."""
        space = self.space

        def path(ref: str) -> str:
            return str(self.paths[ref]) if ref in self.paths else ref

        if space.tokenizer_source is not None:
            return {"tokenizer_source": path(space.tokenizer_source)}
        if space.tokenizer is None:
            return {}
        section = space.tokenizer.model_dump(mode="json", exclude_none=True)
        section["source"] = path(section["source"])
        for entry in (section.get("tokens") or {}).values():
            source = entry.get("source")
            if isinstance(source, str):
                entry["source"] = path(source)
            elif isinstance(source, dict) and "model" in source:
                source["model"] = path(source["model"])
        return {"tokenizer": section}

    def _outer_filters(self, tensors: Sequence[str]) -> list[str]:
        """Filters that give the embedding or head genes to exactly `tensors` (before or after the
        layers): the short names Llama-style recipes use where they pick these tensors and no
        other, else each tensor's full name (which only it contains: `wte`, `embed_in`, `ln_f`)."""
        everything = self._tensor_order()
        filters: list[str] = []
        for tensor in tensors:
            short = next(
                (
                    alias
                    for alias in _SHORT_FILTERS
                    if alias in tensor and all(name in tensors for name in everything if alias in name)
                ),
                tensor,
            )
            if short not in filters:
                filters.append(short)
        return filters

    def _as_method(self, params, block, method, filt=CATCH_ALL):
        """Gene values of a set, read as if the block used `method`."""
        forced = dict(params)
        gene = self._method_of_block.get(block)
        if gene:
            forced[gene] = method
        elif method != self.methods[0]:
            raise ValueError(f"{method} is not this genome's method")
        return self.block_params(forced, block, filt)

    def _vocabulary(self) -> Vocabulary | None:
        """The output vocabulary of every candidate, when the space sets a tokenizer source:
        built once from all its models, the base's tokenizer first (merge/vocab.py)."""
        space = self.space
        source = space.vocabulary_source()
        if source is None:
            return None
        section = space.tokenizer
        return build_vocabulary(
            source=source,
            paths=self.paths,
            vocab_sizes={name: config_vocab_size(model.config) for name, model in self.models.items()},
            models=[*([self.base] if self.base else []), *self.finetunes],
            tokenizer_base=self.base or self.finetunes[0],
            tokens=section.tokens if section else None,
            pad_to_multiple_of=section.pad_to_multiple_of if section else None,
            file=space.source_path,
            field="tokenizer" if section else "tokenizer_source",
        )

    def _vocab_tensor(self, tensor: str) -> bool:
        """An embedding or output head read through the vocabulary permutation."""
        if self.vocab is None or tensor not in (*self.layout.pre, *self.layout.post):
            return False
        return all(
            tensor in m.tensors and is_vocab_tensor(m.tensors[tensor].shape, config_vocab_size(m.config))
            for m in self.models.values()
        )

    def _check_compatible(self) -> None:
        reference_name = self.base or self.finetunes[0]
        reference = self.models[reference_name]
        for model in self.models.values():
            if model.architecture != reference.architecture:
                raise CompatibilityError(
                    f"{model.path}: architecture {model.architecture} differs from {reference_name}'s {reference.architecture}"
                )
            if model.tensors.keys() != reference.tensors.keys():
                raise CompatibilityError(
                    describe_name_difference(
                        model.path, "", set(model.tensors), reference.path, "", set(reference.tensors)
                    )
                )
            for tensor, info in model.tensors.items():
                if info.shape != reference.tensors[tensor].shape and not (
                    self._vocab_tensor(tensor) and info.shape[1:] == reference.tensors[tensor].shape[1:]
                ):
                    shapes = [info.shape, reference.tensors[tensor].shape]
                    raise CompatibilityError(
                        f"{model.path}: {tensor} has shape {list(info.shape)}, {reference_name} has "
                        f"{list(reference.tensors[tensor].shape)}{shape_mismatch_hint(tensor, shapes)}"
                    )


# What recipes for Llama-style checkpoints call the embedding, head and final norm tensors.
_SHORT_FILTERS = ("embed_tokens", "lm_head", "model.norm")


def _collapse(conditions: list[dict[str, Any]]) -> Any:
    """A filter list, or a plain value when every entry agrees."""
    values = {c["value"] for c in conditions}
    if len(values) == 1:
        return conditions[0]["value"]
    return conditions
