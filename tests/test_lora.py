"""LoRA adapters as merge inputs: the adapter source reads what PEFT's merge_and_unload writes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from families import load_checkpoint, random_family

from evomerge.io.lora import AdapterModel, AdapterRef

# Adapters a user meets: plain LoRA on attention, rsLoRA on attention and MLP with per-module
# ranks and alphas, one that also saves lm_head whole, and one on the embeddings.
ADAPTERS = {
    "plain": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    "rslora": {
        "r": 4,
        "lora_alpha": 6,
        "use_rslora": True,
        "target_modules": ["q_proj", "k_proj", "o_proj", "gate_proj", "down_proj"],
        "rank_pattern": {"layers.1.self_attn.q_proj": 2, "down_proj": 3},
        "alpha_pattern": {"o_proj": 3, r"layers\.[23]\.mlp\.gate_proj": 12},
    },
    "saved_head": {"r": 2, "lora_alpha": 4, "target_modules": ["up_proj", "v_proj"], "modules_to_save": ["lm_head"]},
    "embedding": {"r": 4, "lora_alpha": 4, "target_modules": ["embed_tokens", "gate_proj"]},
}


def make_adapter(base: Path, out: Path, seed: int, **settings) -> Path:
    """A real PEFT adapter over `base`, with its zero-initialised factor (B; an embedding's A) made
    random and its saved modules perturbed."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(**settings))
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if any(part in name for part in ("lora_B", "lora_embedding_A", "modules_to_save")):  # PEFT's zeros
                parameter.add_(torch.randn_like(parameter) * 0.1)
    peft_model.save_pretrained(out)
    return out


def merge_and_unload(base: Path, adapter: Path, out: Path) -> Path:
    """PEFT's own merge, written as a full checkpoint (what users do today)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.save_pretrained(out)
    for tokenizer_file in Path(base).glob("tokenizer*"):
        shutil.copy(tokenizer_file, out / tokenizer_file.name)
    return out


@pytest.fixture(scope="module")
def lora_family(tmp_path_factory):
    """A tiny random Llama base, three adapters over it, and PEFT's merged model of each."""
    root = tmp_path_factory.mktemp("lora")
    paths = random_family(root, finetunes=1)
    from evomerge.demo import build_tokenizer

    build_tokenizer().save_pretrained(paths["base"])  # a search loads the donor's tokenizer
    adapters, merged = {}, {}
    for index, (name, settings) in enumerate(ADAPTERS.items()):
        adapters[name] = make_adapter(paths["base"], root / f"adapter_{name}", seed=index, **settings)
        merged[name] = merge_and_unload(paths["base"], adapters[name], root / f"merged_{name}")
    return {"root": root, "base": paths["base"], "ft1": paths["ft1"], "adapters": adapters, "merged": merged}


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_the_adapter_source_reads_what_merge_and_unload_writes(lora_family, name):
    source = AdapterModel(AdapterRef(lora_family["base"], lora_family["adapters"][name]))
    expected = load_checkpoint(lora_family["merged"][name])
    assert set(source.tensors) == set(expected)
    changed = 0
    for tensor, reference in expected.items():
        got = source.get(tensor)
        assert got.dtype == reference.dtype and got.shape == reference.shape
        assert torch.equal(got, reference), tensor  # PEFT's CPU arithmetic, step for step: bit-identical
        changed += not torch.equal(got, source.base.get(tensor))
    assert changed == len(set(source.adapter.factors) | set(source.adapter.replacements)) > 0


def test_a_bfloat16_base_and_adapter_read_as_peft_merges_them(tmp_path):
    """Half-precision factors are float32 in PEFT's merge (autocast_adapter_dtype); the sum is rounded once."""
    from peft import PeftModel
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    base = random_family(tmp_path, finetunes=0, dtype=torch.bfloat16)["base"]
    adapter = make_adapter(base, tmp_path / "adapter", 0, **ADAPTERS["saved_head"])
    weights = adapter / "adapter_model.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(weights).items()}, weights)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    expected = PeftModel.from_pretrained(model, adapter).merge_and_unload().state_dict()
    source = AdapterModel(AdapterRef(base, adapter))
    assert all(torch.equal(source.get(name), expected[name]) for name in source.tensors)
    assert {source.get(name).dtype for name in source.tensors} == {torch.bfloat16}


def test_a_gpt2_conv1d_adapter_is_transposed_as_fan_in_fan_out_says(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "base")
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    peft_model = get_peft_model(GPT2LMHeadModel.from_pretrained(tmp_path / "base"), lora)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.add_(torch.randn_like(parameter))
    peft_model.save_pretrained(tmp_path / "adapter")
    base = GPT2LMHeadModel.from_pretrained(tmp_path / "base")
    expected = PeftModel.from_pretrained(base, tmp_path / "adapter").merge_and_unload().state_dict()
    source = AdapterModel(AdapterRef(tmp_path / "base", tmp_path / "adapter"))
    assert len(source.adapter.factors) == 4 and all(f.fan_in_fan_out for f in source.adapter.factors.values())
    assert all(torch.equal(source.get(name), expected[name]) for name in source.tensors)


def _run(argv) -> int:
    from evomerge.cli import main

    try:
        main(argv)
    except SystemExit as exc:
        return exc.code
    return 0


MERGES = {
    "linear": """
merge_method: linear
models:
  - {{model: {plain}, parameters: {{weight: 0.6}}}}
  - {{model: {saved_head}, parameters: {{weight: 0.4}}}}
dtype: float32
""",
    "task_arithmetic": """
merge_method: task_arithmetic
base_model: {base}
models:
  - {{model: {rslora}, parameters: {{weight: 0.7}}}}
  - {{model: {plain}, parameters: {{weight: 0.5}}}}
  - {{model: {ft1}, parameters: {{weight: 0.3}}}}
dtype: float32
""",
    "ties": """
merge_method: ties
base_model: {base}
models:
  - {{model: {rslora}, parameters: {{weight: 1.0, density: 0.5}}}}
  - {{model: {saved_head}, parameters: {{weight: 0.8, density: 0.7}}}}
  - {{model: {embedding}, parameters: {{weight: 0.5, density: 0.6}}}}
parameters: {{normalize: true}}
dtype: float32
""",
}


@pytest.mark.parametrize("method", list(MERGES))
def test_a_merge_of_adapters_equals_the_merge_of_their_merged_models(lora_family, tmp_path, method):
    base, adapters, merged = lora_family["base"], lora_family["adapters"], lora_family["merged"]
    as_adapters = {name: f"{base}+{path}" for name, path in adapters.items()}
    as_adapters["plain"] = str(adapters["plain"])  # alone: its base is adapter_config.json's base_model_name_or_path
    as_folders = {name: str(path) for name, path in merged.items()}
    outputs = {}
    for label, models in (("adapters", as_adapters), ("folders", as_folders)):
        config = tmp_path / f"{label}.yml"
        config.write_text(MERGES[method].format(base=base, ft1=lora_family["ft1"], **models))
        outputs[label] = tmp_path / f"out_{label}"
        assert _run(["merge", str(config), str(outputs[label]), "--quiet"]) == 0
    from_adapters, from_folders = load_checkpoint(outputs["adapters"]), load_checkpoint(outputs["folders"])
    assert set(from_adapters) == set(from_folders)
    for name, tensor in from_folders.items():
        assert torch.equal(from_adapters[name], tensor), name  # the same inputs, the same engine: bit-exact
    recipe = outputs["adapters"] / "mergekit_config.yml"  # keeps base+adapter, the adapter given alone too
    assert recipe.read_text().count("/base+../") == sum(f"{{{name}}}" in MERGES[method] for name in ADAPTERS)
    assert _run(["merge", str(recipe), str(tmp_path / "again"), "--quiet"]) == 0
    again = load_checkpoint(tmp_path / "again")
    assert all(torch.equal(again[name], tensor) for name, tensor in from_adapters.items())
    written = json.loads((outputs["adapters"] / "config.json").read_text())
    assert written == {**json.loads((base / "config.json").read_text()), "dtype": "float32"}  # the base's config


def lora_space(lora_family, tmp_path: Path, **extra) -> dict:
    """A search over two adapters (one given alone) and a full fine-tune, scored by mean weight."""
    base, adapters = lora_family["base"], lora_family["adapters"]
    return {
        "models": [
            f"rs@{base}+{adapters['rslora']}",
            f"head@{adapters['saved_head']}",
            f"ft1@{lora_family['ft1']}",
            f"emb@{base}+{adapters['embedding']}",
        ],
        "base_model": f"base@{base}",
        "dtype": "float32",
        "device": "cpu",
        "genome": {"layer_granularity": 2, "methods": ["task_arithmetic", "ties"], "lambda": [0.5, 1.5]},
        "objectives": [{"task": "weights", "metric": "mean"}],
        "eval": {"kind": "weight_mean"},
        "search": {"seed": 0, "n_trials": 3, "study_name": "lora", "storage": f"sqlite:///{tmp_path}/study.db"},
        **extra,
    }


@pytest.mark.parametrize("adapters", ["factors", "cached"])
def test_resident_adapters_merge_as_the_disk_engine_does(lora_family, tmp_path, adapters):
    from evomerge.config.space import parse_space
    from evomerge.genome.parameters import ParameterGenome
    from evomerge.merge.engine import write_checkpoint
    from evomerge.merge.resident import ResidentSources, materialize

    space = parse_space(lora_space(lora_family, tmp_path, adapter_deltas=adapters), base_dir=tmp_path)
    assert space.models[1].path == lora_family["base"]  # an adapter alone: adapter_config.json's base
    genome = ParameterGenome(space)
    sources = ResidentSources(genome.models, dtype=torch.float32, adapters=adapters)
    full = sum(t.numel() * 4 for t in sources.tensors["base"].values())
    lora = [genome.models[name].adapter for name in ("rs", "head", "emb")]
    factor_bytes = sum(f.nbytes for adapter in lora for f in adapter.factors.values())
    saved = sum(t.numel() * 4 for adapter in lora for t in adapter.replacements.values())  # lm_head, embed_tokens
    if adapters == "factors":  # base and ft1, then the adapters' factors and saved tensors, not a model each
        assert sources.nbytes == 2 * full + factor_bytes + saved
    else:
        assert sources.nbytes > 2 * full + factor_bytes
    for trial_seed in range(2):
        params = {
            name: dist.choices[trial_seed % len(dist.choices)]
            if hasattr(dist, "choices")
            else dist.low + (dist.high - dist.low) * (0.3 + 0.4 * trial_seed)
            for name, dist in genome.distributions().items()
        }
        plan = genome.plan(params)
        target = {r.name: torch.zeros(r.shape) for r in plan.tensors}
        materialize(plan, sources, target)
        write_checkpoint(plan, tmp_path / f"disk{trial_seed}", progress=False, copy_tokenizer_files=False)
        on_disk = load_checkpoint(tmp_path / f"disk{trial_seed}")
        for name, tensor in on_disk.items():
            assert torch.equal(target[name], tensor), name


def test_a_search_over_adapters_runs_and_exports_base_plus_adapter(lora_family, tmp_path, monkeypatch):
    from test_evaluator_table import build_weight_mean, check_weight_mean

    from evomerge.config.space import parse_space
    from evomerge.evaluate.factory import EVALUATORS
    from evomerge.evaluate.protocol import EvaluatorKind
    from evomerge.export import export_trial
    from evomerge.search.runner import run_search

    monkeypatch.setitem(EVALUATORS, "weight_mean", EvaluatorKind(build=build_weight_mean, check=check_weight_mean))
    space = parse_space(lora_space(lora_family, tmp_path), base_dir=tmp_path)
    summary = run_search(space, progress=False)
    assert summary.n_complete == 3 and summary.n_failed == 0
    out = tmp_path / "best"
    export_trial(space, out, progress=False)  # verifies the written weights hash to the scored ones
    recipe = (out / "mergekit_config.yml").read_text()
    assert recipe.count("/base+../") >= 2  # both adapters, with their base named
    assert _run(["merge", str(out / "mergekit_config.yml"), str(tmp_path / "again"), "--quiet"]) == 0
    again, exported = load_checkpoint(tmp_path / "again"), load_checkpoint(out)
    assert set(again) == set(exported) and all(torch.equal(again[n], t) for n, t in exported.items())


def _adapter_copy(source: Path, target: Path, **config_changes) -> Path:
    shutil.copytree(source, target)
    config = json.loads((target / "adapter_config.json").read_text())
    (target / "adapter_config.json").write_text(json.dumps({**config, **config_changes}))
    return target


def test_adapter_mistakes_are_one_line_with_exit_2(lora_family, tmp_path, capsys):
    from test_cli_front_door import error_line, evomerge

    base, plain = lora_family["base"], lora_family["adapters"]["plain"]
    orphan = _adapter_copy(plain, tmp_path / "orphan", base_model_name_or_path="meta-llama/Llama-3.2-1B")
    dora = _adapter_copy(plain, tmp_path / "dora", use_dora=True)
    no_base = (
        f"{orphan}: a LoRA adapter whose adapter_config.json base_model_name_or_path names "
        f"'meta-llama/Llama-3.2-1B', not a local folder: give its base as BASE+{orphan}"
    )
    merge = tmp_path / "merge.yml"
    merge.write_text(f"merge_method: linear\nmodels:\n  - {{model: '{orphan}'}}\n")
    assert error_line(evomerge("validate", "merge.yml", cwd=tmp_path)) == f"error: merge.yml: models.0.model: {no_base}"

    cases = {  # in process: the console script's path is the same (tests/test_cli_front_door.py)
        f"{base}+{lora_family['ft1']}": "is not a PEFT adapter folder (no adapter_config.json)",
        f"{base}+{plain}+{plain}": "expected one model and one adapter as 'base+adapter'",
        f"{base}+{dora}": "use_dora: DoRA adapters are not supported",
    }
    for reference, expected in cases.items():
        merge.write_text(f"merge_method: linear\nmodels:\n  - {{model: '{reference}'}}\n")
        capsys.readouterr()
        assert _run(["validate", str(merge)]) == 2
        stderr = capsys.readouterr().err.strip()
        assert len(stderr.splitlines()) == 1 and stderr.startswith("error: ") and expected in stderr, stderr

    space = {**lora_space(lora_family, tmp_path), "genome": {"methods": ["linear"]}}
    space["models"][1] = f"head@{orphan}"
    del space["base_model"]
    (tmp_path / "space.yml").write_text(json.dumps(space))
    assert _run(["validate", str(tmp_path / "space.yml")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'space.yml'}: models.1: {no_base}, or set base_model"


def test_a_space_with_adapters_reaches_ray_workers_and_dataflow_refuses_them(lora_family, tmp_path):
    from evomerge.config.space import SearchSpace, parse_space
    from evomerge.errors import ConfigError
    from evomerge.genome.kinds import make_genome
    from evomerge.workers.ray_pool import space_payload

    space = parse_space(lora_space(lora_family, tmp_path), base_dir=tmp_path)
    on_a_worker = SearchSpace.model_validate(space_payload(space))  # as a Ray actor rebuilds it
    assert [m.source for m in on_a_worker.models] == [m.source for m in space.models]
    assert isinstance(space.models[1].source, AdapterRef)  # the adapter given alone, its base made explicit

    dataflow = parse_space({**lora_space(lora_family, tmp_path), "genome": {"kind": "dataflow"}}, base_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"models\.0: a LoRA adapter cannot be a dataflow genome's source yet"):
        make_genome(dataflow)
