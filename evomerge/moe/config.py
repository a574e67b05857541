"""mergekit-moe's YAML (`base_model`, `experts`, `gate_mode`, ...), as frozen pydantic models.

The same file drives `mergekit-moe` and `evomerge moe`. Unknown keys are errors; the parts we do
not implement (`noise_scale`: random noise on expert weights; `hidden_avg`, `uniform_random`
gates) are unknown keys or values with a one-line message.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import field_validator, model_validator

from evomerge.config.base import StrictModel
from evomerge.config.mergekit_yaml import load_config_file
from evomerge.dtypes import normalize_dtype

GATE_MODES = ("hidden", "cheap_embed", "random")
# Output architectures: the name a user writes in `architecture:` -> the transformers class.
OUTPUT_ARCHITECTURES = {
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}


class Expert(StrictModel):
    """One dense model whose MLP becomes an expert; its prompts place its router row."""

    source_model: str
    positive_prompts: list[str] | None = None
    negative_prompts: list[str] | None = None
    residual_scale: float | None = None  # multiplies the expert's down projection (its output)

    @field_validator("source_model")
    @classmethod
    def _not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("expected a model directory, got an empty string")
        return value


class MoEConfig(StrictModel):
    base_model: str
    experts: list[Expert]
    gate_mode: Literal["hidden", "cheap_embed", "random"] = "hidden"
    experts_per_token: int = 2
    shared_experts: list[Expert] | None = None
    dtype: str | None = None
    architecture: Literal["mixtral", "qwen2_moe", "qwen3_moe"] | None = None

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, value: str | None) -> str | None:
        return None if value is None else normalize_dtype(value)

    @field_validator("architecture", mode="before")
    @classmethod
    def _architecture_spelling(cls, value: object) -> object:
        """mergekit spells them 'Mixtral', 'Qwen MoE', 'Qwen3 MoE'; accept those too."""
        if isinstance(value, str):
            key = value.strip().lower().replace(" ", "_").replace("-", "_")
            return {"qwen_moe": "qwen2_moe", "qwen": "qwen2_moe", "qwen3": "qwen3_moe"}.get(key, key)
        return value

    @model_validator(mode="after")
    def _shape(self) -> MoEConfig:
        if not self.experts:
            raise ValueError("'experts' is empty; expected at least one expert")
        if self.experts_per_token < 1:
            raise ValueError(f"experts_per_token: expected a whole number >= 1, got {self.experts_per_token}")
        if self.experts_per_token > len(self.experts):
            raise ValueError(
                f"experts_per_token: {self.experts_per_token} is more than the {len(self.experts)} experts given"
            )
        if self.gate_mode != "random":
            for index, expert in enumerate([*self.experts, *(self.shared_experts or [])]):
                if not expert.positive_prompts:
                    where = (
                        f"experts[{index}]"
                        if index < len(self.experts)
                        else f"shared_experts[{index - len(self.experts)}]"
                    )
                    raise ValueError(
                        f"{where}.positive_prompts: gate_mode {self.gate_mode} needs at least one prompt per expert"
                    )
            rows = {(tuple(e.positive_prompts or ()), tuple(e.negative_prompts or ())) for e in self.experts}
            if len(self.experts) > 1 and len(rows) == 1:
                raise ValueError(
                    "every expert has the same prompts, so every router row would be the same; "
                    "give each expert prompts of what should go to it"
                )
        return self

    def output_architecture(self, base_model_type: str) -> str:
        """The output's name in OUTPUT_ARCHITECTURES: the one asked for, else Mixtral for a
        Llama/Mistral family without shared experts, Qwen2-MoE with one, Qwen3-MoE for Qwen3."""
        if self.architecture is not None:
            return self.architecture
        if base_model_type == "qwen3":
            return "qwen3_moe"
        return "qwen2_moe" if self.shared_experts else "mixtral"


def load_moe_config(path: Path) -> MoEConfig:
    return load_config_file(path, MoEConfig, "a mapping with base_model and experts (a mergekit-moe YAML)")
