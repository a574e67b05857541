"""The demo family: layout, determinism, held-out data, and the acceptance numbers a search relies on."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from evomerge import demo
from evomerge.demo import SKILLS, DemoRecipe, build_demo_family, heldout_items, load_demo_family, write_task_data
from evomerge.evaluate import TaskEvaluator

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MODEL_FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
TINY = DemoRecipe(pretrain_steps=6, finetune_steps=2, batch_size=8)  # seconds to build; skills not learned


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_family_layout_manifest_and_loading(demo_family):
    assert demo_family.skills == list(SKILLS)
    assert demo_family.base == demo_family.root / "base"
    assert demo_family.finetunes == {skill: demo_family.root / skill for skill in SKILLS}
    assert load_demo_family(demo_family.root) == demo_family

    manifest = json.loads((demo_family.root / "family.json").read_text())
    assert manifest["seed"] == 0 and manifest["builder_version"] == demo.BUILDER_VERSION
    for name, path in demo_family.models.items():
        assert {p.name for p in path.iterdir()} >= MODEL_FILES, name
        assert not list(path.glob("*.bin")), "safetensors only"
        assert manifest["weights_sha256"][name] == sha256(path / "model.safetensors")
        with safe_open(path / "model.safetensors", "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict) == {"F32"}

    model = AutoModelForCausalLM.from_pretrained(demo_family.finetunes["sort"], use_safetensors=True)
    assert isinstance(model, LlamaForCausalLM)
    assert model.config.num_hidden_layers >= 4
    assert model.config.tie_word_embeddings is False
    assert model.config.vocab_size < 200
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert next(model.parameters()).dtype == torch.float32


def test_tokenizer_encodes_like_training_and_lm_eval(demo_family):
    tokenizer = AutoTokenizer.from_pretrained(demo_family.base)
    item = heldout_items("close", "search")[0]
    question, answer = item["question"], item["answer"]
    ids, _, _ = demo._encode_batch([(question, answer)])
    whole = tokenizer(question + " " + answer + "\n")["input_ids"]
    assert ids[0].tolist() == whole
    assert whole[0] == tokenizer.bos_token_id and len(whole) == 1 + len(question + " " + answer + "\n")
    # lm-eval scores the continuation as encode(context + continuation)[len(encode(context)):]
    assert whole[: len(tokenizer(question)["input_ids"])] == tokenizer(question)["input_ids"]
    assert tokenizer.decode(whole, skip_special_tokens=True) == question + " " + answer + "\n"


def test_generation_follows_the_skill(demo_family):
    tokenizer = AutoTokenizer.from_pretrained(demo_family.finetunes["reverse"])
    model = AutoModelForCausalLM.from_pretrained(demo_family.finetunes["reverse"])
    item = heldout_items("reverse", "select")[0]
    inputs = tokenizer(item["question"], return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=10, do_sample=False)
    text = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert text == " " + item["answer"] + "\n"  # stops at the newline (an eos id of the generation config)


def test_build_is_deterministic_and_reused(tmp_path):
    first = build_demo_family(tmp_path / "a", seed=3, progress=False, recipe=TINY)
    second = build_demo_family(tmp_path / "b", seed=3, progress=False, recipe=TINY)
    for name in first.models:
        for file in MODEL_FILES:
            assert (first.models[name] / file).read_bytes() == (second.models[name] / file).read_bytes(), (name, file)

    weights = first.base / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert build_demo_family(tmp_path / "a", seed=3, progress=False, recipe=TINY) == first
    assert weights.stat().st_mtime_ns == stamp, "same seed and recipe: reused, not rebuilt"

    other_seed = build_demo_family(tmp_path / "a", seed=4, progress=False, recipe=TINY)
    assert json.loads((tmp_path / "a" / "family.json").read_text())["seed"] == 4
    assert sha256(other_seed.base / "model.safetensors") != sha256(second.base / "model.safetensors")


def test_build_never_replaces_a_folder_it_did_not_write(tmp_path):
    from evomerge.errors import EvomergeError

    user_model = tmp_path / "family" / "sort"
    user_model.mkdir(parents=True)
    (user_model / "config.json").write_text('{"mine": true}')
    with pytest.raises(EvomergeError, match="did not write"):
        build_demo_family(tmp_path / "family", seed=3, progress=False, recipe=TINY)
    assert (user_model / "config.json").read_text() == '{"mine": true}'
    assert not (tmp_path / "family" / "base").exists(), "refused before any model was written"

    (tmp_path / "file").write_text("x")
    with pytest.raises(EvomergeError, match="not a directory"):
        build_demo_family(tmp_path / "file", seed=3, progress=False, recipe=TINY)


def test_missing_family_error_says_how_to_build(tmp_path):
    with pytest.raises(FileNotFoundError, match="evomerge demo build"):
        load_demo_family(tmp_path)


def test_task_data_is_committed_held_out_and_never_trained_on(tmp_path, tasks_dir):
    for path in write_task_data(tmp_path):
        assert path.read_bytes() == (tasks_dir / "data" / path.name).read_bytes(), f"regenerate {path.name}"

    heldout = set()
    for skill in SKILLS:
        splits = {split: heldout_items(skill, split) for split in ("search", "select")}
        questions = {split: {item["question"] for item in items} for split, items in splits.items()}
        assert len(questions["search"]) == len(questions["select"]) == 100
        assert not questions["search"] & questions["select"]
        for item in splits["search"] + splits["select"]:
            assert len(set(item["choices"])) == 4 and item["choices"][item["label"]] == item["answer"]
            assert demo.SKILL_SPECS[skill].answer(item["question"].split(" ")[1]) == item["answer"]
            heldout.add(item["question"].split(" ")[1])

    sampler = demo._Sampler(0, "test", demo._heldout_inputs())
    for _ in range(3000):
        for skill in SKILLS:
            for question, _ in (sampler.correct(skill), sampler.echo(skill), sampler.demonstration(skill)):
                assert question.split(" ")[1] not in heldout


def _task_arithmetic(base: dict, finetunes: list[dict], lam: float) -> dict:
    return {k: base[k] + lam * sum(ft[k] - base[k] for ft in finetunes) for k in base}


def test_acceptance_skills_are_distinct_and_a_merge_beats_every_finetune(demo_family, tasks_dir):
    """What the merge search needs from the family, on both held-out splits."""
    tasks = demo_family.tasks("search") + demo_family.tasks("select")
    tokenizer = AutoTokenizer.from_pretrained(demo_family.base)
    evaluator = TaskEvaluator(tasks, include_paths=[tasks_dir], tokenizer=tokenizer, batch_size=64)
    model = AutoModelForCausalLM.from_pretrained(demo_family.base)
    states = {name: AutoModelForCausalLM.from_pretrained(p).state_dict() for name, p in demo_family.models.items()}
    finetunes = [states[s] for s in SKILLS]
    states["task arithmetic 0.75"] = _task_arithmetic(states["base"], finetunes, 0.75)
    states["uniform average"] = _task_arithmetic(states["base"], finetunes, 1 / len(finetunes))

    acc: dict[str, dict[str, float]] = {}  # model -> task -> acc
    for name, state in states.items():
        model.load_state_dict(state)
        scores = evaluator.evaluate(model)
        acc[name] = {task: scores[task]["acc,none"] for task in tasks}

    for split in ("search", "select"):
        skill_tasks = dict(zip(SKILLS, demo_family.tasks(split)))
        for skill, task in skill_tasks.items():
            others = ["base", *(s for s in SKILLS if s != skill)]
            assert acc[skill][task] >= 0.9, (skill, split, acc[skill][task])
            for other in others:
                assert acc[skill][task] >= acc[other][task] + 0.2, (skill, other, split)

        def mean(name: str, skill_tasks=skill_tasks) -> float:
            return sum(acc[name][t] for t in skill_tasks.values()) / len(skill_tasks)

        best_finetune = max(mean(s) for s in SKILLS)
        assert mean("task arithmetic 0.75") >= best_finetune + 0.5, (split, mean("task arithmetic 0.75"))
        # The uniform average does not do it: a search has to find the weights.
        assert mean("uniform average") < best_finetune
