"""`evomerge inspect`: the task-vector math on hand-built tensors, sampling, and the real command."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from families import random_family, write_yaml
from test_cli_front_door import error_line, evomerge

from evomerge.genome.spec import GenomeSpec
from evomerge.inspect import GroupStats, Inspection, Sampling, advise, inspect_file, inspect_models
from evomerge.inspect.groups import default_group_size, tensor_kind
from evomerge.inspect.sampling import EntryReader
from evomerge.inspect.vectors import pair_stats, sum_norm_ratio, tensor_sums
from evomerge.io.model_dir import ModelDir

DENSITIES = (0.5, 1.0)


def stats_of(base, *deltas, densities=DENSITIES, scale=1.0):
    sums = tensor_sums(torch.tensor(base), torch.tensor(deltas), densities, scale=scale)
    return pair_stats(sums, densities)


def test_identical_deltas_have_cosine_one_no_conflict_and_full_overlap():
    stats = stats_of([1.0, 2.0, 2.0, 4.0], [0.3, -0.1, 0.2, 0.5], [0.3, -0.1, 0.2, 0.5])
    assert stats.cosine[0][1] == pytest.approx(1.0)
    assert stats.sign_conflict[0][1] == 0.0
    assert stats.trim_overlap[0][0][1] == 1.0 and stats.trim_overlap_conflict[0][0][1] == 0.0
    assert stats.relative_norm[0] == pytest.approx(math.sqrt(0.09 + 0.01 + 0.04 + 0.25) / 5.0)


def test_opposite_deltas_have_cosine_minus_one_and_conflict_everywhere():
    stats = stats_of([1.0, 1.0, 1.0], [0.3, -0.1, 0.2], [-0.3, 0.1, -0.2])
    assert stats.cosine[0][1] == pytest.approx(-1.0)
    assert stats.sign_conflict[0][1] == 1.0
    assert stats.trim_overlap[0][0][1] == 1.0 and stats.trim_overlap_conflict[0][0][1] == 1.0


def test_sign_conflict_counts_entries_both_change():
    # both non-zero at entries 0, 1, 2; opposite signs at entry 1 only
    stats = stats_of([1.0] * 4, [1.0, 1.0, 1.0, 1.0], [1.0, -1.0, 2.0, 0.0])
    assert stats.sign_conflict[0][1] == pytest.approx(1 / 3)
    assert stats.sign_conflict[1][0] == stats.sign_conflict[0][1]


def test_ties_trim_overlap_and_kept_energy():
    # density 0.5 of 4 entries: a keeps entries {0, 1}, b keeps {1, 2}; they share entry 1, with opposite signs
    a = [4.0, 3.0, 1.0, 0.5]
    b = [0.1, -5.0, 6.0, 0.2]
    stats = stats_of([1.0] * 4, a, b)
    assert stats.trim_overlap[0][0][1] == pytest.approx(0.5)
    assert stats.trim_overlap_conflict[0][0][1] == 1.0
    assert stats.kept_energy[0][0] == pytest.approx(25 / (16 + 9 + 1 + 0.25))
    assert stats.trim_overlap[1][0][1] == 1.0 and stats.kept_energy[1][1] == pytest.approx(1.0)  # density 1 keeps all


def test_sums_add_across_tensors_and_scale_leaves_ratios():
    first = tensor_sums(torch.tensor([1.0, 1.0]), torch.tensor([[1.0, 0.0], [0.0, 1.0]]), DENSITIES)
    second = tensor_sums(torch.tensor([1.0, 1.0]), torch.tensor([[1.0, 1.0], [1.0, 1.0]]), DENSITIES, scale=3.0)
    stats = pair_stats(first + second, DENSITIES)
    # concatenated: a = (1, 0, 1, 1 x3 weight) ... dot = 0 + 3 * 2 = 6, |a|^2 = 1 + 3 * 2 = 7
    assert stats.cosine[0][1] == pytest.approx(6 / 7)
    assert stats.tensors == 2
    assert pair_stats(second, DENSITIES).cosine[0][1] == pytest.approx(1.0)


def test_sum_norm_ratio_between_orthogonal_and_aligned():
    assert sum_norm_ratio(((1.0, 0.0), (0.0, 1.0)), (1.0, 1.0)) == pytest.approx(math.sqrt(2))
    assert sum_norm_ratio(((1.0, 1.0), (1.0, 1.0)), (1.0, 1.0)) == pytest.approx(2.0)


def inspection_of(*deltas, densities=(0.5,)):
    """An Inspection of hand-built task vectors (one tensor, one layer group), for the reading's rules."""
    stats = stats_of([1.0] * len(deltas[0]), *deltas, densities=densities)
    return Inspection(
        base="base",
        models=tuple(f"m{i}" for i in range(len(deltas))),
        overall=stats,
        layer_groups=(GroupStats("layer 0", stats),),
        kinds=(GroupStats("mlp", stats),),
        num_layers=1,
        group_size=1,
        sampling=Sampling(),
        skipped=(),
        seconds=0.0,
    )


def test_the_reading_follows_the_cosine():
    aligned = advise(inspection_of([1.0, 2.0, 0.5, 0.1], [1.1, 2.0, 0.4, 0.1]))
    assert aligned.reading[0].startswith("High positive cosine") and aligned.genome["methods"] == [
        "linear",
        "task_arithmetic",
    ]
    assert aligned.genome["weight"] == [0.25, 1.0]  # sum ~2x one task vector: start near 0.5
    opposed = advise(inspection_of([1.0, 2.0, 0.5, 0.1], [-1.0, -1.5, 0.5, 0.0]))
    assert opposed.reading[0].startswith("Negative cosine (below -0.1: m0-m1") and "density" in opposed.genome
    spread = advise(inspection_of([10.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]))
    assert spread.reading[0].startswith("Cosine near zero")
    assert any("10.0x spread (> 3.0x)" in sentence for sentence in spread.reading)
    for advice in (aligned, opposed, spread):
        GenomeSpec.model_validate(advice.genome)


def test_models_equal_to_the_base_are_named():
    assert advise(inspection_of([0.0, 0.0], [0.0, 0.0])).reading == (
        "Every model equals the base in the entries read (task vectors of norm 0): nothing to merge.",
    )
    assert advise(inspection_of([0.0, 0.0], [1.0, 0.0])).reading[0].startswith("m0 equals the base")


def test_one_model_has_sizes_but_no_pairs():
    advice = advise(inspection_of([1.0, -2.0, 0.5, 0.1]))
    assert advice.reading[0].startswith("One model: no pairs")
    GenomeSpec.model_validate(advice.genome)


def test_tensor_kinds_and_group_sizes():
    assert tensor_kind("model.layers.3.self_attn.q_proj.weight") == "attn.q"
    assert tensor_kind("model.layers.3.self_attn.o_proj.weight") == "attn.o"
    assert tensor_kind("model.layers.3.mlp.down_proj.weight") == "mlp"
    assert tensor_kind("model.layers.3.post_attention_layernorm.weight") == "norm"
    assert tensor_kind("transformer.h.0.attn.c_attn.weight") == "attn.qkv"
    assert tensor_kind("model.embed_tokens.weight") == "embed" and tensor_kind("lm_head.weight") == "head"
    assert [default_group_size(n) for n in (4, 32, 30, 28, 1)] == [1, 8, 10, 7, 1]


def test_sampled_spans_are_seeded_disjoint_and_read_the_same_entries(tmp_path):
    sampling = Sampling(entries=512, span=128, seed=3)
    spans = sampling.spans("lm_head.weight", 3072)
    assert spans == sampling.spans("lm_head.weight", 3072) != Sampling(512, 128, 4).spans("lm_head.weight", 3072)
    assert len(spans) == 4 and all(length == 128 for _, length in spans)
    ends = [start + length for start, length in spans]
    assert all(end <= next_start for end, (next_start, _) in zip(ends, spans[1:])) and ends[-1] <= 3072
    assert sampling.spans("small", 512) is None and Sampling(entries=0).spans("any", 10**9) is None
    paths = random_family(tmp_path, finetunes=1, dtype=torch.bfloat16)
    model = ModelDir(paths["ft1"])
    flat = model.get("lm_head.weight").reshape(-1).float()
    with EntryReader() as reader:
        read = reader.read(model, "lm_head.weight", spans)
    assert torch.equal(read, torch.cat([flat[s : s + n] for s, n in spans]))


def test_a_sample_estimates_the_full_statistics(tmp_path):
    paths = random_family(tmp_path, finetunes=2)
    models = [("ft1", paths["ft1"]), ("ft2", paths["ft2"])]
    full = inspect_models(("base", paths["base"]), models, sampling=Sampling(entries=0))
    sampled = inspect_models(("base", paths["base"]), models, sampling=Sampling(entries=1024, span=128))
    assert full.overall.entries_read == full.overall.entries > sampled.overall.entries_read
    assert sampled.overall.entries == full.overall.entries
    assert np.allclose(sampled.overall.relative_norm, full.overall.relative_norm, rtol=0.05)
    assert abs(sampled.overall.cosine[0][1] - full.overall.cosine[0][1]) < 0.05
    assert [g.name for g in full.layer_groups] == ["embeddings", "layer 0", "layer 1", "layer 2", "layer 3", "head"]


def test_the_demo_family_reads_as_related_skills_with_a_valid_starting_genome(demo_family, tmp_path):
    root = demo_family.root
    space = write_yaml(
        tmp_path / "space.yml",
        f"models: [{', '.join(f'{n}@{root / n}' for n in ('close', 'reverse', 'shift', 'sort'))}]\n"
        f"base_model: base@{root / 'base'}\n"
        "genome: {layer_granularity: 2, methods: [task_arithmetic, ties]}\n"
        "objectives: [{task: demo_close}]\nsearch: {n_trials: 1}\n",
    )
    inspection = inspect_file(space)
    assert inspection.group_size == 2 and [g.name for g in inspection.layer_groups][1:3] == ["layers 0-1", "layers 2-3"]
    cosines = [inspection.overall.cosine[i][j] for i in range(4) for j in range(i + 1, 4)]
    assert all(0.1 < c < 0.5 for c in cosines), cosines  # skills trained from one base: related, not aligned
    advice = advise(inspection)
    assert advice.reading[0].startswith("Moderate positive cosine")
    assert advice.genome["methods"] == ["task_arithmetic", "ties"]
    GenomeSpec.model_validate(advice.genome)  # pastes into a space file as it is

    result = evomerge("inspect", str(space), "--plot", "cos.png", "--json", "cos.json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Cosine by layer group (2 per group)" in result.stdout and "A starting genome" in result.stdout
    assert (tmp_path / "cos.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "cos.json").read_text())
    assert saved["inspection"]["models"] == ["close", "reverse", "shift", "sort"]
    assert saved["advice"]["genome"] == advice.genome


def test_a_merge_yaml_of_unrelated_task_vectors_reads_as_interference(tmp_path):
    paths = random_family(tmp_path, finetunes=2)  # independent random task vectors: cosine near 0
    config = write_yaml(
        tmp_path / "merge.yml",
        f"merge_method: ties\nbase_model: {paths['base']}\nmodels:\n"
        f"  - model: {paths['ft1']}\n    parameters: {{weight: 1, density: 0.5}}\n"
        f"  - model: {paths['ft2']}\n    parameters: {{weight: 1, density: 0.5}}\n",
    )
    inspection = inspect_file(config, densities=(0.2, 0.6))
    assert inspection.models == ("ft1", "ft2") and abs(inspection.overall.cosine[0][1]) < 0.1
    advice = advise(inspection)
    assert advice.reading[0].startswith("Cosine near zero") and advice.genome["methods"] == ["ties", "dare_ties"]
    assert inspection.overall.sign_conflict[0][1] == pytest.approx(0.5, abs=0.05)
    assert inspection.overall.trim_overlap[0][0][1] == pytest.approx(0.2, abs=0.05)  # chance level


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["inspect", "nobase.yml"], "nobase.yml: base_model: inspect compares each model with the base"),
        (["inspect", "nobase.yml", "--density", "1.5"], "--density: expected a share of entries in (0, 1]"),
        (["inspect", "nobase.yml", "--plot", "x.jpg"], "--plot x.jpg: expected a .png file name"),
    ],
)
def test_mistakes_are_one_line(tmp_path, argv, expected):
    (tmp_path / "m").mkdir()
    write_yaml(tmp_path / "nobase.yml", "merge_method: linear\nmodels: [{model: m}]\n")
    assert expected in error_line(evomerge(*argv, cwd=tmp_path))
