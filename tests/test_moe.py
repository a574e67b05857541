"""`evomerge moe`: the demo family's skills as experts, checked tensor by tensor against mergekit-moe 0.1.5.

Both tools read the same YAML; the two outputs are compared as the models transformers loads
(mergekit writes Mixtral's experts fused, as `mlp.experts.gate_up_proj`; evomerge writes what
`save_pretrained` writes, `block_sparse_moe.experts.E.w1/w2/w3`). Hidden-state and embedding gates
are deterministic, so every tensor must be equal, bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from cli_in_process import exit_code as run
from families import tiny_arch_family, tiny_config

SKILL_PROMPTS = {  # different lengths, so the batches are left-padded
    "reverse": ["reverse abc =", "reverse qwertyu ="],
    "sort": ["sort 3142 =", "sort 90 ="],
    "shift": ["shift ABCD ="],
    "close": ["close ([{ ="],
}


def demo_config(family: dict[str, Path], gate_mode: str, **extra) -> dict:
    experts = []
    for skill, prompts in SKILL_PROMPTS.items():
        expert = {"source_model": str(family[skill]), "positive_prompts": prompts}
        if skill == "reverse":
            expert["negative_prompts"] = ["sort 21 ="]
        experts.append(expert)
    return {
        "base_model": str(family["base"]),
        "gate_mode": gate_mode,
        "experts_per_token": 2,
        "experts": experts,
        **extra,
    }


@pytest.fixture(scope="module")
def family(demo_family) -> dict[str, Path]:
    return {"base": demo_family.base, **demo_family.finetunes}


def mergekit_moe(config: dict, out: Path) -> None:
    from mergekit.merge import MergeOptions
    from mergekit.moe.config import MoEMergeConfig
    from mergekit.scripts.moe import build

    build(
        MoEMergeConfig.model_validate(config),
        str(out),
        MergeOptions(device="cpu", copy_tokenizer=False, quiet=True),
        device="cpu",
    )


def assert_same_model(ours: Path, theirs: Path) -> None:
    from transformers import AutoModelForCausalLM

    mine = AutoModelForCausalLM.from_pretrained(ours).state_dict()
    other = AutoModelForCausalLM.from_pretrained(theirs).state_dict()
    assert mine.keys() == other.keys()
    for name in mine:
        assert torch.equal(mine[name], other[name]), name


def write(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.mark.parametrize("gate_mode", ["hidden", "cheap_embed"])
def test_mixtral_from_the_demo_family_matches_mergekit_moe_tensor_by_tensor(
    family, tmp_path, gate_mode, one_torch_thread
):
    pytest.importorskip("mergekit.moe")
    config = demo_config(family, gate_mode)
    assert run(["moe", write(tmp_path / "moe.yml", config), tmp_path / "ours", "--quiet"]) == 0
    mergekit_moe(config, tmp_path / "mergekit")
    assert_same_model(tmp_path / "ours", tmp_path / "mergekit")
    written = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert (written["architectures"], written["num_local_experts"], written["num_experts_per_tok"]) == (
        ["MixtralForCausalLM"], 4, 2,
    )  # fmt: skip


def test_the_moe_loads_routes_and_generates(family, tmp_path, one_torch_thread):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = demo_config(family, "hidden", experts_per_token=1)
    assert run(["moe", write(tmp_path / "moe.yml", config), tmp_path / "out", "--quiet"]) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    # experts_per_token 1: a token routed to expert e runs e's MLP only
    router = model.model.layers[1].mlp.gate.weight
    assert router.shape == (4, 64)
    torch.testing.assert_close(router.norm(dim=-1), torch.ones(4), atol=1e-2, rtol=0)  # unit rows (computed in bf16)
    # Layer 0 reads the last token's embedding: '=' ends the positive and the negative prompts of
    # 'reverse' alike, so its row there is zero (the difference of equal vectors is not normalised up).
    assert not model.model.layers[0].mlp.gate.weight[0].any()
    ids = tokenizer("reverse abc =", return_tensors="pt")["input_ids"]
    generated = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, ids.shape[1] + 4)
    assert (tmp_path / "out" / "mergekit_moe_config.yml").read_text() == (tmp_path / "moe.yml").read_text()


def test_random_gates_are_seeded(family, tmp_path):
    from safetensors.torch import load_file

    config = write(tmp_path / "moe.yml", demo_config(family, "random"))
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        assert run(["moe", config, tmp_path / name, "--seed", seed, "--quiet"]) == 0
    gates = [
        load_file(tmp_path / n / "model.safetensors")["model.layers.0.block_sparse_moe.gate.weight"] for n in "abc"
    ]
    assert torch.equal(gates[0], gates[1]) and not torch.equal(gates[0], gates[2])


def test_qwen2_moe_with_a_shared_expert_matches_mergekit_moe(family, tmp_path, one_torch_thread):
    pytest.importorskip("mergekit.moe")
    shared = {"source_model": str(family["base"]), "positive_prompts": ["reverse abc =", "sort 12 ="]}
    config = demo_config(family, "hidden", shared_experts=[shared], architecture="qwen")
    assert run(["moe", write(tmp_path / "moe.yml", config), tmp_path / "ours", "--quiet"]) == 0
    mergekit_moe(config, tmp_path / "mergekit")
    assert_same_model(tmp_path / "ours", tmp_path / "mergekit")


def test_qwen3_moe_from_qwen3_experts_matches_mergekit_moe(tmp_path, one_torch_thread):
    pytest.importorskip("mergekit.moe")
    paths = tiny_arch_family("qwen3", tmp_path / "family")
    config = {
        "base_model": str(paths["base"]),
        "gate_mode": "cheap_embed",
        "experts": [
            {"source_model": str(paths["ft1"]), "positive_prompts": ["reverse abc ="]},
            {"source_model": str(paths["ft2"]), "positive_prompts": ["sort 123 ="], "negative_prompts": ["abc"]},
        ],
    }
    assert run(["moe", write(tmp_path / "moe.yml", config), tmp_path / "ours", "--quiet"]) == 0
    mergekit_moe(config, tmp_path / "mergekit")
    assert_same_model(tmp_path / "ours", tmp_path / "mergekit")


def test_router_row_math_by_hand():
    from evomerge.moe import gates

    ids, mask = gates.left_padded([[1, 5], [1, 6, 7]], pad_id=1)
    assert ids.tolist() == [[1, 1, 5], [1, 6, 7]] and mask.tolist() == [[0, 1, 1], [1, 1, 1]]
    embed = torch.eye(8)[:, :4] * 2  # token t -> 2 * e_t for t < 4, zero otherwise
    # tokens 1, 1 (masked pad), 5 | 1, 6, 7: the unmasked sum is 2*e1 + 2*e1 = (0, 4, 0, 0)
    assert gates.embedding_sum(embed, ids, mask).tolist() == [[0.0, 1.0, 0.0, 0.0]]
    states = torch.zeros(2, 2, 3, 4)  # (layers, prompts, positions, hidden)
    states[:, 0, -1] = torch.tensor([2.0, 0, 0, 0])
    states[:, 1, -1] = torch.tensor([0, 4.0, 0, 0])
    states[:, :, 0] = 100  # earlier positions never count
    assert gates.last_token_mean(states).tolist() == [[1.0, 2.0, 0, 0]] * 2
    rows = gates.router_rows(
        [([[1]], [[2]]), ([[3]], [])], lambda ids, mask: torch.eye(4)[ids[:, -1]].mean(0, keepdim=True), pad_id=0
    )
    half = 2**-0.5
    assert torch.allclose(rows, torch.tensor([[[0, half, -half, 0], [0, 0, 0, 1.0]]]))
    assert not gates.unit_rows(torch.zeros(1, 4)).any()  # equal prompt sets: a zero row, not NaN


def one_line_error(capsys, argv) -> str:
    assert run(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    return err


def test_an_expert_of_another_shape_is_one_line(family, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    narrow = tiny_config("llama", layers=4, vocab_size=89, hidden_size=64, intermediate_size=96, head_dim=16)
    AutoModelForCausalLM.from_config(narrow).save_pretrained(tmp_path / "narrow")
    config = demo_config(family, "cheap_embed")
    config["experts"][2]["source_model"] = str(tmp_path / "narrow")
    capsys.readouterr()  # save_pretrained's progress bar
    err = one_line_error(capsys, ["moe", write(tmp_path / "moe.yml", config), tmp_path / "out"])
    assert "narrow" in err and "model.layers.0.mlp.gate_proj.weight has shape (96, 64)" in err and "(128, 64)" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("prompt", "expected"), [("", "'' gives no tokens"), ("€€", "'€€' gives only the unknown token")]
)
def test_a_prompt_that_tokenises_to_nothing_is_one_line(family, tmp_path, capsys, prompt, expected):
    config = demo_config(family, "hidden")
    config["experts"][1]["positive_prompts"] = ["sort 12 =", prompt]
    err = one_line_error(capsys, ["moe", write(tmp_path / "moe.yml", config), tmp_path / "out"])
    assert "moe.yml: experts[1].positive_prompts[1]: " + expected in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("change", "field", "expected"),
    [
        ({"gate_mode": "hiden"}, "gate_mode", "'hidden', 'cheap_embed' or 'random'"),
        ({"experts_per_token": 5}, "experts_per_token", "more than the 4 experts"),
        ({"noise_scale": 0.1}, "noise_scale", "unknown field"),
    ],
)
def test_config_mistakes_are_one_line(family, tmp_path, capsys, change, field, expected):
    config = {**demo_config(family, "hidden"), **change}
    err = one_line_error(capsys, ["moe", write(tmp_path / "moe.yml", config), tmp_path / "out"])
    assert field in err and expected in err, err


def test_an_existing_output_is_replaced_only_with_overwrite(family, tmp_path, capsys):
    config = write(tmp_path / "moe.yml", demo_config(family, "random"))
    assert run(["moe", config, tmp_path / "out", "--quiet"]) == 0
    assert run(["moe", config, tmp_path / "out", "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert run(["moe", config, tmp_path / "out", "--quiet", "--overwrite"]) == 0


def test_a_base_without_a_tokenizer_is_one_line_for_prompt_gates(family, tmp_path, capsys):
    import shutil

    (tmp_path / "bare").mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(family["base"] / name, tmp_path / "bare" / name)
    config = {**demo_config(family, "cheap_embed"), "base_model": str(tmp_path / "bare")}
    err = one_line_error(capsys, ["moe", write(tmp_path / "moe.yml", config), tmp_path / "out"])
    assert "moe.yml: base_model: " in err and "has no tokenizer that loads" in err
    config["gate_mode"] = "random"  # needs no tokenizer
    assert run(["moe", write(tmp_path / "moe.yml", config), tmp_path / "out", "--quiet"]) == 0


def test_a_routing_search_scores_moes_and_exports_the_one_it_scored(family, tmp_path, capsys, tasks_dir):
    from evomerge.config.space import load_space
    from evomerge.store.trial_store import TrialStore

    skills = list(SKILL_PROMPTS)
    space = {
        "models": [f"{skill}@{family[skill]}" for skill in skills],
        "base_model": f"base@{family['base']}",
        "device": "cpu",
        "genome": {"kind": "moe", "prompts": SKILL_PROMPTS, "experts_per_token": [1, 2]},
        "objectives": [{"task": f"demo_{s}", "metric": "acc,none", "name": s} for s in skills],
        "eval": {"include_paths": [str(tasks_dir)], "limit": 8, "batch_size": 64},
        "search": {"sampler": "random", "seed": 0, "n_trials": 3, "study_name": "moe", "finalists": 0},
    }
    space_file = write(tmp_path / "space.yml", space)
    assert run(["run", space_file, "-q"]) == 0, capsys.readouterr().err
    store = TrialStore(load_space(space_file).storage_url)
    trials = store.trials("moe")
    assert len(trials) == 3 and all(t.status == "complete" for t in trials), [t.failure for t in trials]
    assert {t.genome["gate_mode"] for t in trials} <= {"hidden", "cheap_embed"}
    assert all(t.plan_yaml.startswith("# Made by evomerge (genome kind moe)") for t in trials)
    assert set(store.references("moe", "search")) == {"base", *skills}
    assert len(store.scores("moe", "search")) == 3  # every MoE scored on every skill
    assert all(len(scores) == len(skills) for scores in store.scores("moe", "search").values())
    capsys.readouterr()
    assert run(["export", space_file, tmp_path / "export", "-q"]) == 0, capsys.readouterr().err
    assert "matches the scored model" in capsys.readouterr().out
    exported = json.loads((tmp_path / "export" / "config.json").read_text())
    assert exported["architectures"] == ["MixtralForCausalLM"]


FIRST, SECOND = list(SKILL_PROMPTS)[:2]


@pytest.mark.parametrize(
    ("genome", "field", "expected"),
    [
        ({"prompts": {"reverse": ["reverse ab ="]}}, "genome.prompts", "none for sort"),
        ({"prompts": {**SKILL_PROMPTS, "tidy": ["x"]}}, "genome.prompts", "'tidy' is not a fine-tune"),
        ({"prompts": SKILL_PROMPTS, "experts_per_token": [1, 5]}, "genome.experts_per_token", "at most 4"),
        ({"prompts": SKILL_PROMPTS, "gate_modes": ["hidden", "learned"]}, "genome.gate_modes.1", "'hidden'"),
        # what each trial's MoE build would refuse, found once before the search
        ({"prompts": {**SKILL_PROMPTS, SECOND: SKILL_PROMPTS[FIRST]}}, f"genome.prompts.{SECOND}", f"as '{FIRST}'"),
        ({"prompts": {**SKILL_PROMPTS, FIRST: ["ok", ""]}}, f"genome.prompts.{FIRST}.1", "'' gives no tokens"),
    ],
)
def test_moe_genome_mistakes_are_one_line(family, tmp_path, capsys, tasks_dir, genome, field, expected):
    skills = list(SKILL_PROMPTS)
    space = {
        "models": [f"{skill}@{family[skill]}" for skill in skills],
        "base_model": f"base@{family['base']}",
        "genome": {"kind": "moe", **genome},
        "objectives": [{"task": f"demo_{s}", "metric": "acc,none"} for s in skills],
        "eval": {"include_paths": [str(tasks_dir)]},
        "search": {"n_trials": 2},
    }
    err = one_line_error(capsys, ["validate", write(tmp_path / "space.yml", space)])
    assert f"space.yml: {field}: " in err and expected in err, err
