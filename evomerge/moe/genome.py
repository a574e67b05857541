"""Genome kind `moe`: a search over routing choices of a mixture of the space's fine-tunes.

What a search can really vary in a MoE built without training: which fine-tunes become experts
(one on/off gene each), how many experts each token uses (`experts_per_token`, clamped to the
number chosen) and how the router rows are placed (`gate_mode`, among those the space allows).
The prompts are the user's description of each expert, not genes: `genome.prompts` gives them
per fine-tune. A candidate is the MoE `evomerge moe` writes for the decoded mergekit-moe YAML,
scored like any other; export writes the same checkpoint, and its hash proves it.

    genome:
      kind: moe
      prompts: {reverse: ["reverse abc ="], sort: ["sort 312 ="]}
      gate_modes: [hidden, cheap_embed]
      experts_per_token: [1, 2]
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import Field, field_validator

from evomerge.config.base import StrictModel
from evomerge.errors import ConfigError, InvalidPathError
from evomerge.io.model_dir import ModelDir
from evomerge.moe.config import MoEConfig

if TYPE_CHECKING:
    from evomerge.config.space import SearchSpace

GateMode = Literal["hidden", "cheap_embed", "random"]


class MoEGenomeSpec(StrictModel):
    """The space file's `genome:` section for `kind: moe` (see the module docstring)."""

    kind: Literal["moe"] = "moe"
    prompts: dict[str, list[str]] = Field(description="positive prompts per fine-tune (every fine-tune listed)")
    gate_modes: list[GateMode] = Field(default_factory=lambda: ["hidden", "cheap_embed"])
    experts_per_token: tuple[int, int] = (1, 2)

    @field_validator("gate_modes")
    @classmethod
    def _modes(cls, value: list[str]) -> list[str]:
        if not value or len(set(value)) != len(value):
            raise ValueError(f"expected one or more distinct gate modes, got {value}")
        return value

    @field_validator("experts_per_token")
    @classmethod
    def _range(cls, value: tuple[int, int]) -> tuple[int, int]:
        if not 1 <= value[0] <= value[1]:
            raise ValueError(f"expected [low, high] with 1 <= low <= high, got {list(value)}")
        return value

    def merge_methods(self) -> list[str]:
        return []


GATE_GENE = "gate_mode"
K_GENE = "experts_per_token"


def expert_gene(name: str) -> str:
    return f"expert.{name}"


class MoEGenome:
    """Genome kind `moe` (see evomerge.genome.protocol.Genome for what callers use)."""

    def __init__(self, space: SearchSpace, models: Mapping[str, ModelDir] | None = None):
        self.space = space
        self.spec: MoEGenomeSpec = space.genome
        self.finetunes = [m.name for m in space.models]
        if space.base_model is None:
            raise ConfigError(
                "genome kind moe takes attention and embeddings from base_model: set it",
                file=space.source_path,
                field="base_model",
            )
        self.base = space.base_model.name
        for index, model in enumerate(space.models):
            if model.adapter is not None:
                raise ConfigError(
                    "a LoRA adapter cannot be an expert yet; merge it into its base first",
                    file=space.source_path,
                    field=f"models.{index}",
                )
        missing = [name for name in self.finetunes if not self.spec.prompts.get(name)]
        if missing:
            raise ConfigError(
                f"give positive prompts for every fine-tune; none for {missing[0]}",
                file=space.source_path,
                field="genome.prompts",
            )
        unknown = sorted(set(self.spec.prompts) - set(self.finetunes))
        if unknown:
            raise ConfigError(
                f"'{unknown[0]}' is not a fine-tune of this space ({', '.join(self.finetunes)})",
                file=space.source_path,
                field="genome.prompts",
            )
        if self.spec.experts_per_token[1] > len(self.finetunes):
            raise ConfigError(
                f"at most {len(self.finetunes)} experts per token (the fine-tunes), got {self.spec.experts_per_token[1]}",
                file=space.source_path,
                field="genome.experts_per_token",
            )
        self.paths = {m.name: m.path for m in space.models} | {self.base: space.base_model.path}
        self.models = (
            dict(models) if models else {n: ModelDir(p, allow_pickle=space.allow_pickle) for n, p in self.paths.items()}
        )

    def check(self) -> str:
        """For validate and run, before any trial: what every trial's MoE build would refuse (the
        family and the experts' MLP shapes; prompts the base's tokenizer cannot read, or two
        fine-tunes with the same prompts), found once here instead of in every trial."""
        from evomerge.moe.build import base_tokenizer, check_family, readable_prompt_ids

        where = self.space.source_path
        config = MoEConfig.model_validate(self.moe_config(self.uniform_params()))  # every fine-tune an expert
        opened = {str(self.paths[name]): model for name, model in self.models.items()}
        architecture = check_family(config, where or Path("space.yml"), opened[config.base_model], opened)
        line = f"moe: {architecture} of up to {len(self.finetunes)} experts"
        modes = [mode for mode in self.spec.gate_modes if mode != "random"]
        if not modes:
            return line
        seen: dict[tuple[str, ...], str] = {}
        for name in self.finetunes:
            other = seen.setdefault(tuple(self.spec.prompts[name]), name)
            if other != name:
                raise ConfigError(
                    f"the same prompts as '{other}': a trial choosing both would give them the same router row",
                    file=where,
                    field=f"genome.prompts.{name}",
                )
        tokenizer = base_tokenizer(self.models[self.base], where or Path("space.yml"), modes[0])
        for name in self.finetunes:
            for number, text in enumerate(self.spec.prompts[name]):
                readable_prompt_ids(tokenizer, text, file=where, field=f"genome.prompts.{name}.{number}")
        return f"{line}; every prompt readable by the base's tokenizer"

    def distributions(self) -> dict[str, Any]:
        from optuna.distributions import CategoricalDistribution, IntDistribution

        genes: dict[str, Any] = {GATE_GENE: CategoricalDistribution(list(self.spec.gate_modes))}
        genes[K_GENE] = IntDistribution(*self.spec.experts_per_token)
        for name in self.finetunes:
            genes[expert_gene(name)] = CategoricalDistribution([True, False])
        return genes

    def suggest(self, trial: Any) -> dict[str, Any]:
        """Ask an optuna trial for every gene (optuna records them as the trial's params)."""
        params: dict[str, Any] = {GATE_GENE: trial.suggest_categorical(GATE_GENE, list(self.spec.gate_modes))}
        params[K_GENE] = trial.suggest_int(K_GENE, *self.spec.experts_per_token)
        for name in self.finetunes:
            params[expert_gene(name)] = trial.suggest_categorical(expert_gene(name), [True, False])
        return params

    def parent_params(self, model: str) -> dict[str, Any] | None:
        return None  # a one-expert MoE keeps the base's attention: not the fine-tune itself

    def uniform_params(self) -> dict[str, Any] | None:
        return {GATE_GENE: self.spec.gate_modes[0], K_GENE: self.spec.experts_per_token[0]} | {
            expert_gene(name): True for name in self.finetunes
        }

    def chosen(self, params: Mapping[str, Any]) -> list[str]:
        experts = [name for name in self.finetunes if params[expert_gene(name)]]
        if not experts:
            raise InvalidPathError("no fine-tune is chosen as an expert")
        return experts

    def moe_config(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """The mergekit-moe YAML (as a mapping) of one trial's genes."""
        experts = self.chosen(params)
        return {
            "base_model": str(self.paths[self.base]),
            "gate_mode": params[GATE_GENE],
            "experts_per_token": min(int(params[K_GENE]), len(experts)),
            "dtype": self.space.dtype,
            "experts": [
                {"source_model": str(self.paths[name]), "positive_prompts": list(self.spec.prompts[name])}
                for name in experts
            ],
        }

    def validated(self, params: Mapping[str, Any]) -> MoEConfig:
        return MoEConfig.model_validate(self.moe_config(params))

    def plan(self, params: Mapping[str, Any], *, seed: int | None = None, metadata: Mapping[str, Any] | None = None):
        raise TypeError("a moe genome's candidates are MoE checkpoints (moe_config), not merge plans")

    def to_yaml(self, params: Mapping[str, Any]) -> str:
        return "# Made by evomerge (genome kind moe): a mergekit-moe YAML\n" + yaml.safe_dump(
            self.moe_config(params), sort_keys=False
        )

    def describe(self, params: Mapping[str, Any]) -> str:
        experts = self.chosen(params)
        k = min(int(params[K_GENE]), len(experts))
        return f"moe {params[GATE_GENE]}: {k} of {'+'.join(experts)} per token"

    def outline(self) -> str:
        return f"{len(self.finetunes) + 2} routing genes over {len(self.finetunes)} candidate experts"


def builds_moe(genome: Any) -> bool:
    """A genome whose candidates are MoE checkpoints (`moe_config(params)`)."""
    return callable(getattr(genome, "moe_config", None))


def write_candidate(genome: MoEGenome, params: Mapping[str, Any], out_dir: Path, *, progress: bool = False):
    """Write one trial's MoE into the (staging) folder `out_dir`: what the worker scores and export writes."""
    from evomerge.moe.build import opened_models, write_moe

    config = genome.validated(params)
    recipe = genome.to_yaml(params)
    where = Path(genome.space.source_path or "space.yml")
    with opened_models(config) as models:
        return write_moe(config, where, recipe, models, Path(out_dir), progress=progress)
