"""Git Re-Basin: permute one model's hidden units to match another's (`evomerge align`)."""

from evomerge.align.matching import MatchResult, apply_permutations, permute_tensor, split_fused, weight_matching
from evomerge.align.run import AlignReport, align_models
from evomerge.align.spec import SUPPORTED, PermutationSpec, permutation_spec

__all__ = [
    "SUPPORTED",
    "AlignReport",
    "MatchResult",
    "PermutationSpec",
    "align_models",
    "apply_permutations",
    "permutation_spec",
    "permute_tensor",
    "split_fused",
    "weight_matching",
]
