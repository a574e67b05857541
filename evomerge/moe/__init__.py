"""Mixture-of-experts assembly from same-shape dense models (mergekit-moe's YAML)."""

from evomerge.moe.build import MoEReport, build_moe
from evomerge.moe.config import GATE_MODES, MoEConfig, load_moe_config

__all__ = ["GATE_MODES", "MoEConfig", "MoEReport", "build_moe", "load_moe_config"]
