"""Differing vocabularies (merge/vocab.py): the output vocabulary and the permuted embedding and
head rows, compared with mergekit 0.1.5 on a tiny family whose fine-tunes add tokens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from families import load_checkpoint, random_family, write_yaml
from safetensors.torch import load_file, save_file

from evomerge.config.mergekit_yaml import load_merge_config, load_yaml_file
from evomerge.merge.engine import run_merge
from evomerge.merge.planner import plan_merge

transformers = pytest.importorskip("transformers")
CHAT = ["<|im_start|>", "<|im_end|>"]


def _base_tokenizer(size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    words = [chr(ord("a") + i % 26) * (1 + i // 26) for i in range(size - len(specials))]
    model = models.WordLevel({w: i for i, w in enumerate(specials + words)}, unk_token="<unk>")
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def _grow(path: Path, tokenizer, seed: int, rows: int | None = None) -> None:
    """Save `tokenizer` with the model and append random embedding and head rows for its new
    tokens (up to `rows`: padding rows no token uses, as many checkpoints have)."""
    tokenizer.save_pretrained(path)
    rows = rows or len(tokenizer)
    generator = torch.Generator().manual_seed(seed)
    for file in path.glob("*.safetensors"):
        tensors = load_file(file)
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            old = tensors[name]
            extra = torch.randn(rows - old.shape[0], old.shape[1], generator=generator) * 0.2
            tensors[name] = torch.cat([old, extra.to(old.dtype)])
        save_file(tensors, file, metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config["vocab_size"] = rows
    (path / "config.json").write_text(json.dumps(config))


def added_token_family(root: Path) -> dict[str, str]:
    """base (96 tokens); a: chat tokens as special tokens; b: a vocabulary word the base lacks
    ('oooo', id 96), then '<|im_end|>' and '<tool>' as plain added tokens (other ids, other
    settings); c: the base's vocabulary in 100 rows (4 of padding)."""
    paths = random_family(root, finetunes=3)
    _base_tokenizer(96).save_pretrained(paths["base"])
    a = transformers.AutoTokenizer.from_pretrained(paths["base"])
    a.add_special_tokens({"additional_special_tokens": CHAT})
    _grow(paths["ft1"], a, 1)
    b = _base_tokenizer(97)
    b.add_tokens(["<|im_end|>", "<tool>"])
    _grow(paths["ft2"], b, 2)
    _grow(paths["ft3"], _base_tokenizer(96), 3, rows=100)
    return {"base": str(paths["base"]), "a": str(paths["ft1"]), "b": str(paths["ft2"]), "c": str(paths["ft3"])}


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return added_token_family(tmp_path_factory.mktemp("vocab"))


def run_mergekit(config_path: Path, out: Path, monkeypatch) -> None:
    """mergekit-yaml in process, its model order made the config's (0.1.5 takes a Python set's
    order, random per process, for the union's order and for the base of a base-less merge)."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge as mergekit_run
    from mergekit.options import MergeOptions

    config = MergeConfiguration.model_validate(load_yaml_file(config_path))
    refs = [config.base_model] if config.base_model else []
    refs += [m.model for m in config.models or ()]
    refs += [s.model for sl in config.slices or () for s in sl.sources]
    order = list(dict.fromkeys(refs))
    monkeypatch.setattr(MergeConfiguration, "referenced_models", lambda self: list(order))
    mergekit_run(
        config,
        str(out),
        options=MergeOptions(device="cpu", quiet=True, random_seed=0, write_model_card=False),
    )


def both(tmp_path: Path, text: str, monkeypatch):
    config_path = write_yaml(tmp_path / "merge.yml", text)
    ours, theirs = tmp_path / "ours", tmp_path / "mergekit"
    run_merge(plan_merge(load_merge_config(config_path), config_path=config_path), ours, progress=False, workers=2)
    run_mergekit(config_path, theirs, monkeypatch)
    return ours, theirs


def _tokenizer_view(path: Path):
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    added = {i: (t.content, t.special, t.normalized) for i, t in tokenizer.added_tokens_decoder.items()}
    return tokenizer.get_vocab(), added, json.loads((path / "config.json").read_text())["vocab_size"]


def assert_same_merge(ours: Path, theirs: Path, exact: bool = True) -> dict[str, torch.Tensor]:
    a, b = load_checkpoint(ours), load_checkpoint(theirs)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].shape == b[name].shape and a[name].dtype == b[name].dtype, name
        if exact:
            assert torch.equal(a[name], b[name]), name
        else:
            torch.testing.assert_close(a[name], b[name], rtol=2e-6, atol=2e-6, msg=name)
    assert _tokenizer_view(ours) == _tokenizer_view(theirs)
    return a


METHODS = {
    "linear": """
merge_method: linear
models:
  - {{model: {base}, parameters: {{weight: 0.3}}}}
  - {{model: {a}, parameters: {{weight: 0.3}}}}
  - {{model: {b}, parameters: {{weight: 0.2}}}}
  - {{model: {c}, parameters: {{weight: 0.2}}}}
""",
    "task_arithmetic": """
merge_method: task_arithmetic
base_model: {base}
models:
  - {{model: {a}, parameters: {{weight: 0.8}}}}
  - {{model: {b}, parameters: {{weight: 0.5}}}}
  - {{model: {c}, parameters: {{weight: 0.3}}}}
""",
    "ties": """
merge_method: ties
base_model: {base}
models:
  - {{model: {a}, parameters: {{weight: 1.0, density: 0.5}}}}
  - {{model: {b}, parameters: {{weight: 0.6, density: 0.7}}}}
""",
}
SOURCES = {
    "union": "tokenizer_source: union\n",
    "base": "tokenizer_source: base\n",
    "model": "tokenizer_source: {b}\n",
    "section": """
tokenizer:
  source: union
  pad_to_multiple_of: 8
  tokens:
    <|im_start|>: {{source: {{kind: model_token, model: {b}, token: <|im_end|>}}}}
    <tool>: {{source: {{kind: zero}}}}
    dd: {{source: {a}, force: true}}
    <new>: {{source: {{kind: model_token, model: {base}, token_id: 3}}}}
""",
}


@pytest.mark.parametrize("source", sorted(SOURCES))
@pytest.mark.parametrize("method", sorted(METHODS))
def test_same_merge_and_tokenizer_as_mergekit(tmp_path, family, method, source, monkeypatch):
    text = METHODS[method].format(**family) + SOURCES[source].format(**family) + "dtype: float32\n"
    ours, theirs = both(tmp_path, text, monkeypatch)
    merged = assert_same_merge(ours, theirs)
    vocab, _, size = _tokenizer_view(ours)
    assert merged["model.embed_tokens.weight"].shape[0] == size >= len(vocab)


@pytest.mark.parametrize("method", ["linear", "task_arithmetic"])
def test_bfloat16_math_aligns_in_bfloat16_as_mergekit_does(tmp_path, family, method, monkeypatch):
    """float32 sources, `dtype: bfloat16`: both cast before permuting, so the means of a token
    several models have are taken in bf16 too."""
    text = METHODS[method].format(**family) + SOURCES["section"].format(**family) + "dtype: bfloat16\n"
    ours, theirs = both(tmp_path, text, monkeypatch)
    merged = assert_same_merge(ours, theirs)
    assert merged["lm_head.weight"].dtype == torch.bfloat16


# -- a search: candidates merged in memory, their recipe and their export ------------------------


def vocab_space(family: dict[str, str], tmp_path: Path, methods: list[str], **vocabulary):
    import yaml

    from evomerge.config.space import parse_space

    data = {
        "models": [f"a@{family['a']}", f"b@{family['b']}", f"c@{family['c']}"],
        "base_model": f"base@{family['base']}",
        "dtype": "float32",
        "genome": {"layer_granularity": 2, "methods": methods},
        "objectives": [{"task": "t1"}],
        "search": {"n_trials": 5},
        **vocabulary,
    }
    return parse_space(data, base_dir=tmp_path, source="space.yml", text=yaml.safe_dump(data))


def _params(genome, seed: int) -> dict:
    import random

    rng = random.Random(seed)
    return {
        name: (rng.choice(d.choices) if hasattr(d, "choices") else rng.uniform(d.low, d.high))
        for name, d in genome.distributions().items()
    }


def _resident(genome, params) -> tuple[str, dict[str, torch.Tensor]]:
    from evomerge.io.hashing import weights_hash
    from evomerge.merge.resident import ResidentSources, materialize

    plan = genome.plan(params)
    sources = ResidentSources(genome.models, dtype=torch.float32, vocab=genome.vocab, vocab_base=genome.base)
    target = {r.name: torch.zeros(r.shape) for r in plan.tensors}
    materialize(plan, sources, target)
    materialize(plan, sources, target)  # the second trial reads the permutation kept by the first
    return weights_hash(target), target


SECTION = {
    "tokenizer": {
        "source": "union",
        "pad_to_multiple_of": 8,
        "tokens": {"<|im_start|>": {"source": {"kind": "model_token", "model": "b", "token": "<|im_end|>"}}},
    }
}


@pytest.mark.parametrize("vocabulary", [{"tokenizer_source": "union"}, SECTION], ids=["union", "section"])
def test_search_candidate_equals_its_recipe_and_mergekit(tmp_path, family, vocabulary, monkeypatch):
    from evomerge.genome.parameters import ParameterGenome
    from evomerge.io.hashing import checkpoint_hash

    genome = ParameterGenome(vocab_space(family, tmp_path, ["ties"], **vocabulary))
    params = _params(genome, 1)
    digest, merged = _resident(genome, params)
    assert merged["model.embed_tokens.weight"].shape[0] == genome.vocab.size
    run_merge(genome.plan(params), tmp_path / "disk", progress=False, workers=2)  # what export writes
    assert checkpoint_hash(tmp_path / "disk") == digest
    config = write_yaml(tmp_path / "recipe.yml", genome.plan(params).recipe_yaml)
    run_mergekit(config, tmp_path / "mk", monkeypatch)
    assert_same_merge(tmp_path / "disk", tmp_path / "mk", exact=False)


def test_search_with_several_methods_merges_in_memory_as_on_disk(tmp_path, family):
    from evomerge.genome.parameters import ParameterGenome
    from evomerge.io.hashing import checkpoint_hash

    genome = ParameterGenome(vocab_space(family, tmp_path, ["ties", "linear", "slerp"], **SECTION))
    notes = set()
    for seed in range(3):
        params = _params(genome, seed)
        methods = {value for name, value in params.items() if name.endswith("method")}
        noted = "# Vocabulary: a part merges only some" in genome.plan(params).recipe_yaml
        notes.add(noted == bool(methods & {"linear", "slerp"}))  # no base; one fine-tune per slice
        digest, _ = _resident(genome, params)
        run_merge(genome.plan(params), tmp_path / f"disk{seed}", progress=False, workers=2)
        assert checkpoint_hash(tmp_path / f"disk{seed}") == digest
        assert json.loads((tmp_path / f"disk{seed}" / "config.json").read_text())["vocab_size"] == 104
    assert notes == {True}
    ties_only = ParameterGenome(vocab_space(family, tmp_path, ["ties"], **SECTION))
    assert "# Vocabulary" not in ties_only.plan(_params(ties_only, 0)).recipe_yaml


def test_a_space_names_its_tokenizer_models_by_name(tmp_path, family):
    from evomerge.errors import ConfigError

    with pytest.raises(ConfigError, match="tokenizer_source: 'zz' is not a model of this space"):
        vocab_space(family, tmp_path, ["ties"], tokenizer_source="zz")


def test_search_worker_model_and_tokenizer_take_the_output_vocabulary(tmp_path, family):
    from evomerge.genome.parameters import ParameterGenome
    from evomerge.io.hashing import checkpoint_hash
    from evomerge.merge.vocab import load_output_tokenizer
    from evomerge.workers.builders import MergedCandidates

    space = vocab_space(family, tmp_path, ["task_arithmetic"], **SECTION)
    genome = ParameterGenome(space)
    builder = MergedCandidates(genome, space, dtype=torch.float32, device="cpu")
    params = _params(genome, 2)
    candidate = builder.build(params)
    run_merge(genome.plan(params), tmp_path / "disk", progress=False, workers=2)
    assert candidate.weights_hash == checkpoint_hash(tmp_path / "disk")
    assert builder.model.get_input_embeddings().weight.shape[0] == 104
    tokenizer = load_output_tokenizer(genome.vocab)
    assert tokenizer.convert_tokens_to_ids(["oooo", "<|im_start|>", "<|im_end|>", "<tool>"]) == [96, 97, 98, 99]
    reference = builder.reference("b")  # a source model, its rows in the output vocabulary
    rows = load_file(Path(family["b"]) / "model.safetensors")["model.embed_tokens.weight"]
    embed = reference.get_input_embeddings().weight
    assert torch.equal(embed[:97], rows[:97]) and torch.equal(embed[98], rows[97])  # '<|im_end|>': b's id 97


def _cli(argv: list[str]) -> int:
    from evomerge.cli import main

    try:
        main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def test_written_recipe_reproduces_the_merge_from_the_model_folder(tmp_path, family):
    """The recipe copied into the output names every model (tokenizer ones included) relative to it."""
    from evomerge.io.hashing import checkpoint_hash

    text = METHODS["ties"].format(**family) + SOURCES["section"].format(**family) + "dtype: float32\n"
    config = write_yaml(tmp_path / "merge.yml", text)
    assert _cli(["merge", str(config), str(tmp_path / "out"), "-q"]) == 0
    recipe = (tmp_path / "out" / "mergekit_config.yml").read_text()
    assert family["b"] not in recipe and "<|im_start|>" in recipe
    assert _cli(["merge", str(tmp_path / "out" / "mergekit_config.yml"), str(tmp_path / "again"), "-q"]) == 0
    assert checkpoint_hash(tmp_path / "again") == checkpoint_hash(tmp_path / "out")
    assert (tmp_path / "again" / "tokenizer.json").read_bytes() == (tmp_path / "out" / "tokenizer.json").read_bytes()


@pytest.mark.parametrize(
    "tokenizer, message",
    [
        ("tokenizer: {tokens: {<tool>: {}}}", "tokenizer.tokens.<tool>.source: token '<tool>' needs a source"),
        ("tokenizer: {tokens: {x: {source: /elsewhere}}}", "tokenizer.tokens.x.source: '/elsewhere' is not one of"),
        ("tokenizer: {tokens: {x: {source: {kind: model_token, model: {a}, token: zzz9}}}}", "token 'zzz9' is not in"),
        (
            "tokenizer: {tokens: {<x>: {source: {kind: model_token, model: {a}, token_id: 500}}}}",
            "<x>.source: token row 500",
        ),
    ],
)
def test_token_rule_mistakes_are_one_line(tmp_path, family, tokenizer, message, capsys):
    text = METHODS["linear"].format(**family) + tokenizer.replace("{a}", family["a"]) + "\n"
    config = write_yaml(tmp_path / "merge.yml", text)
    assert _cli(["merge", str(config), str(tmp_path / "out"), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_fill_rules(family):
    """mergekit's fill rules, row by row, on tensors whose rows say where they came from."""
    from evomerge.config.mergekit_yaml import TokenEmbedding
    from evomerge.merge.vocab import build_vocabulary

    names = ["base", "a", "b", "c"]
    sizes = {"base": 96, "a": 98, "b": 99, "c": 100}
    vocab = build_vocabulary(
        source="union",
        paths={n: Path(family[n]) for n in names},
        vocab_sizes=sizes,
        models=names,
        tokenizer_base="base",
        tokens={"dd": TokenEmbedding(source="a", force=True), "<z>": TokenEmbedding(source={"kind": "zero"})},
        pad_to_multiple_of=8,
    )
    assert vocab.tokens[96:] == ("oooo", "<|im_start|>", "<|im_end|>", "<tool>", "<z>") and vocab.size == 104
    tensors = [torch.arange(sizes[n], dtype=torch.float32)[:, None] + 1000 * i for i, n in enumerate(names)]
    base, a, b, c = (t[:, 0].tolist() for t in vocab.align(names, tensors, "base"))
    dd = vocab.tokens.index("dd")
    assert base[:96] != a[:96] and base[5] == 5 and a[5] == 1005  # own rows kept
    assert base[dd] == a[dd] == b[dd] == c[dd] == 1000 + dd  # forced from a
    assert base[96] == a[96] == c[96] == b[96] == 2096  # 'oooo': only b has it
    assert base[97] == b[97] == c[97] == a[97] == 1096  # '<|im_start|>': only a
    assert a[98] == 1097 and b[98] == 2097 and base[98] == c[98] == (1097 + 2097) / 2  # '<|im_end|>': the mean
    assert base[99] == a[99] == c[99] == b[99] == 2098  # '<tool>': only b
    assert base[100] == a[100] == 0  # '<z>': zero
    padding = torch.tensor(base[:101]).mean().item()
    assert base[101:] == [pytest.approx(padding)] * 3
    # a tensor of a and b alone, no base: '<|im_end|>' both have; '<|im_start|>' a only
    a2, b2 = (t[:, 0].tolist() for t in vocab.align(["a", "b"], tensors[1:3], None))
    assert a2[98] == 1097 and b2[98] == 2097 and b2[97] == 1096


def test_a_dataflow_space_refuses_a_tokenizer_source(tmp_path, family):
    from evomerge.errors import ConfigError

    with pytest.raises(ConfigError, match="works with genome kind 'parameters', not 'dataflow'"):
        vocab_space(family, tmp_path, ["ties"], tokenizer_source="union", genome={"kind": "dataflow"})


@pytest.mark.slow
def test_search_and_export_with_added_tokens(tmp_path, demo_family):
    """A search over demo fine-tunes that added tokens: every trial scored with the output
    vocabulary, the export hash-verified and written with the union tokenizer."""
    import shutil

    import yaml

    from evomerge.cli import main  # noqa: F401  (the console script _cli runs)

    root = tmp_path / "family"
    shutil.copytree(demo_family.base, root / "base")
    chat = shutil.copytree(demo_family.finetunes["reverse"], root / "chat")
    tool = shutil.copytree(demo_family.finetunes["sort"], root / "tool")
    tokenizer = transformers.AutoTokenizer.from_pretrained(chat)
    tokenizer.add_special_tokens({"additional_special_tokens": CHAT})
    _grow(chat, tokenizer, 1)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tool)
    tokenizer.add_tokens(["<tool>"])
    _grow(tool, tokenizer, 2)
    repo = Path(__file__).resolve().parents[1]
    data = {
        "models": [f"chat@{chat}", f"tool@{tool}"],
        "base_model": f"base@{root / 'base'}",
        "dtype": "float32",
        "device": "cpu",
        "tokenizer": {"source": "union", "pad_to_multiple_of": 4},
        "genome": {"layer_granularity": 2, "methods": ["task_arithmetic"]},
        "objectives": [{"task": "demo_reverse", "metric": "acc,none"}],
        "eval": {"include_paths": [str(repo / "tasks")], "limit": 10, "batch_size": 64},
        "search": {"sampler": "random", "seed": 0, "n_trials": 3, "study_name": "vocab"},
    }
    space = tmp_path / "space.yml"
    space.write_text(yaml.safe_dump(data, sort_keys=False))
    assert _cli(["run", str(space), "-q"]) == 0
    assert _cli(["export", str(space), str(tmp_path / "export"), "-q"]) == 0
    exported = tmp_path / "export"
    vocab, added, size = _tokenizer_view(exported)
    assert size == 92 and [added[i][0] for i in (89, 90, 91)] == [*CHAT, "<tool>"]
    assert load_checkpoint(exported)["lm_head.weight"].shape == (92, 64)
    model = transformers.AutoModelForCausalLM.from_pretrained(exported)
    assert model.get_input_embeddings().weight.shape[0] == 92


# -- a base whose tokenizer names more tokens than its model has rows: trimmed, as mergekit does --


def _bpe_tokenizer():
    """A BPE tokenizer of 98 vocabulary tokens ('z', a merge's first part, last) and 2 added ones."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    letters = [chr(ord("a") + i) for i in range(26)]
    pairs = [(letters[i], letters[i + 1]) for i in range(25)] + [("ab", "c"), ("abc", "d")]
    words = [f"w{i}" for i in range(98 - 4 - 26 - len(pairs))]
    vocab = ["<pad>", "<s>", "</s>", "<unk>", *letters[:-1], *words, *(a + b for a, b in pairs), "z"]
    tokenizer = Tokenizer(models.BPE({t: i for i, t in enumerate(vocab)}, pairs, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.add_tokens(["<x1>", "<x2>"])
    return fast


@pytest.fixture(scope="module")
def trimmed_family(tmp_path_factory):
    """base: the BPE tokenizer's 100 tokens over 97 rows ('z' and the added tokens have none);
    a: 97 rows as well; b: the tokenizer plus '<tool>', all 101 rows."""
    from evomerge.llama_shape import LlamaShape

    shape = LlamaShape(vocab=97, hidden=32, intermediate=64, layers=2, heads=4, kv_heads=2)
    paths = random_family(tmp_path_factory.mktemp("trimmed"), finetunes=2, shape=shape)
    _bpe_tokenizer().save_pretrained(paths["base"])
    _bpe_tokenizer().save_pretrained(paths["ft1"])
    b = _bpe_tokenizer()
    b.add_tokens(["<tool>"])
    _grow(paths["ft2"], b, 5)
    return {"base": str(paths["base"]), "a": str(paths["ft1"]), "b": str(paths["ft2"])}


@pytest.mark.parametrize("source", ["union", "base"])
def test_base_tokenizer_trimmed_to_its_rows_as_mergekit_does(tmp_path, trimmed_family, source, monkeypatch):
    text = f"""
merge_method: task_arithmetic
base_model: {trimmed_family["base"]}
models:
  - {{model: {trimmed_family["b"]}, parameters: {{weight: 0.4}}}}
tokenizer_source: {source}
dtype: float32
"""
    ours, theirs = both(tmp_path, text, monkeypatch)
    assert_same_merge(ours, theirs)
    vocab, added, size = _tokenizer_view(ours)
    if source == "base":
        assert size == len(vocab) == 97 and "z" not in vocab and not {"<x1>", "<x2>"} & set(vocab)
    else:
        assert size == len(vocab) == 101 and vocab["z"] == 97 and vocab["<tool>"] == 100


def test_tokens_a_model_names_beyond_its_rows_are_tokens_it_lacks(tmp_path, trimmed_family):
    """a's tokenizer names 'z', '<x1>', '<x2>' but a has no rows for them; b has: mergekit 0.1.5
    fails (KeyError) when such a token is in the output, we fill a's rows as for any token it lacks."""
    text = f"""
merge_method: linear
models:
  - {{model: {trimmed_family["a"]}, parameters: {{weight: 0.5}}}}
  - {{model: {trimmed_family["b"]}, parameters: {{weight: 0.5}}}}
tokenizer_source: union
dtype: float32
"""
    config = write_yaml(tmp_path / "merge.yml", text)
    run_merge(plan_merge(load_merge_config(config), config_path=config), tmp_path / "out", progress=False)
    merged = load_checkpoint(tmp_path / "out")["model.embed_tokens.weight"]
    b_rows = load_checkpoint(trimmed_family["b"])["model.embed_tokens.weight"]
    vocab, _, size = _tokenizer_view(tmp_path / "out")
    assert size == 101 and vocab["<x1>"] == 98
    # the tokenizer base is a (first listed): its trimmed vocabulary first, then b's tokens
    assert torch.equal(merged[98], b_rows[98])  # only b has a row for '<x1>': both models read it


def test_trimming_drops_the_merges_that_make_a_dropped_token(tmp_path):
    """mergekit 0.1.5 keeps them and the tokenizers library refuses the result; we drop them."""
    from evomerge.merge.vocab import _trim

    tokenizer = _trim(_bpe_tokenizer(), 96, "base", None, "tokenizer_source")  # drops 'abcd' and 'z'
    tokenizer.save_pretrained(tmp_path)
    reloaded = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert len(reloaded) == 96 and "abcd" not in reloaded.get_vocab() and "abc" in reloaded.get_vocab()
    assert reloaded.tokenize("abcd yz") == ["abc", "d", "y", "z"] or "z" not in reloaded.get_vocab()


def test_multi_part_search_recipe_reproduces_the_trial(tmp_path, family):
    """Two methods: a mergekit-multi recipe, each part with the tokenizer section; evomerge merge
    of it writes the scored weights and the union tokenizer."""
    from evomerge.genome.parameters import ParameterGenome
    from evomerge.io.hashing import checkpoint_hash

    genome = ParameterGenome(vocab_space(family, tmp_path, ["ties", "task_arithmetic"], **SECTION))
    params = next(
        p for p in (_params(genome, seed) for seed in range(20)) if len({p["g0.method"], p["g1.method"]}) == 2
    )
    digest, _ = _resident(genome, params)
    recipe = genome.plan(params).recipe_yaml
    assert "# Vocabulary" not in recipe and recipe.count("pad_to_multiple_of") == 2
    config = write_yaml(tmp_path / "multi.yml", recipe)
    assert _cli(["merge", str(config), str(tmp_path / "out"), "-q"]) == 0
    assert checkpoint_hash(tmp_path / "out") == digest
    vocab, _, size = _tokenizer_view(tmp_path / "out")
    assert size == 104 and vocab["<tool>"] == 99
