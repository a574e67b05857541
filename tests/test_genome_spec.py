"""The genome section checks each method's own rules at the corners of the searched ranges, from
the method's spec (no method is named here or in the schema)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from evomerge.genome.spec import GenomeSpec


@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_a_range_a_method_refuses_at_one_end_is_refused(method):
    with pytest.raises(ValidationError, match=rf"{method} cannot take every value the genome searches: .*density=0.05"):
        GenomeSpec(methods=[method], density=(0.05, 0.9))
    with pytest.raises(ValidationError, match=r"density=0.95, epsilon=0.09"):
        GenomeSpec(methods=["ties", method], density=(0.3, 0.95))
    with pytest.raises(ValidationError, match=r"density=0.05"):  # a fixed value is a corner too
        GenomeSpec(methods=[method], density=0.05)


def test_ranges_inside_every_rule_pass():
    assert GenomeSpec(methods=["della", "ties"], density=(0.3, 0.9)).gene_range("density") == (0.3, 0.9)
    assert GenomeSpec(methods=["ties", "breadcrumbs"], density=(0.01, 1.0), gamma=(0.0, 0.2)).methods == [
        "ties",
        "breadcrumbs",
    ]
