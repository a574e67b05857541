"""Malformed configs and input models: every one is a one-line error with exit 2, never a traceback.

A corpus of mistakes a new user makes (wrong types, non-finite numbers, lists where scalars go,
duplicate keys, binary files, truncated or NaN-holding checkpoints, unknown tasks, metrics and
sampler options, out-of-range values ...) in both file kinds, run through `evomerge validate`
(in process for the bulk, the real console script for a sample). `validate` checks what `run`
needs, so each case that passes here would otherwise have crashed or failed every trial later.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_in_process import captured
from families import random_family
from safetensors.torch import load_file, save_file

from evomerge.demo import build_tokenizer
from evomerge.errors import ConfigError
from evomerge.synthetic import LlamaShape

REPO = Path(__file__).resolve().parent.parent
TASKS = REPO / "tasks"


class _Pickled:
    """Unpickles to os.getcwd(): harmless, but a global torch's weights-only loader refuses."""

    def __reduce__(self):
        return (os.getcwd, ())


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rewrite(path: Path, change) -> None:
    tensors = load_file(path / "model.safetensors")
    change(tensors)
    save_file(tensors, path / "model.safetensors")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """The random family plus one broken variant per kind of input-model mistake."""
    root = tmp_path_factory.mktemp("malformed_models")
    family = random_family(root / "family")
    out = {name: Path(path) for name, path in family.items()}
    build_tokenizer().save_pretrained(out["base"])  # a search scores every candidate with the donor's
    ft2 = out["ft2"]

    out["truncated"] = _copy(ft2, root / "truncated")
    weights = out["truncated"] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])

    out["garbage_header"] = _copy(ft2, root / "garbage_header")
    weights = out["garbage_header"] / "model.safetensors"
    data = weights.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    weights.write_bytes(data[:8] + b"{" * length + data[8 + length :])

    out["bad_offsets"] = _copy(ft2, root / "bad_offsets")
    weights = out["bad_offsets"] / "model.safetensors"
    data = weights.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    name = next(k for k in header if k != "__metadata__")
    header[name]["data_offsets"][1] += 4
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    weights.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + length :])

    out["nan"] = _copy(ft2, root / "nan")
    _rewrite(out["nan"], lambda t: t["model.layers.1.mlp.up_proj.weight"].view(-1).__setitem__(3, float("nan")))
    out["inf"] = _copy(ft2, root / "inf")
    _rewrite(out["inf"], lambda t: t["model.norm.weight"].__setitem__(0, float("inf")))
    out["missing"] = _copy(ft2, root / "missing")
    _rewrite(out["missing"], lambda t: t.pop("model.layers.2.self_attn.k_proj.weight"))

    wide = random_family(
        root / "wide",
        finetunes=1,
        shape=LlamaShape(vocab=96, hidden=48, intermediate=64, layers=4, heads=4, kv_heads=2),
    )
    out["hidden48"] = Path(wide["ft1"])

    out["pickle_blocked"] = root / "pickle_blocked"
    out["pickle_blocked"].mkdir()
    shutil.copy(ft2 / "config.json", out["pickle_blocked"] / "config.json")
    torch.save(
        {"model.embed_tokens.weight": torch.zeros(2, 2), "x": _Pickled()}, out["pickle_blocked"] / "pytorch_model.bin"
    )

    out["no_config"] = _copy(ft2, root / "no_config")
    (out["no_config"] / "config.json").unlink()
    out["bad_config"] = _copy(ft2, root / "bad_config")
    (out["bad_config"] / "config.json").write_text("{not json")
    out["list_config"] = _copy(ft2, root / "list_config")
    (out["list_config"] / "config.json").write_text("[1, 2]")
    out["layers_text"] = _copy(ft2, root / "layers_text")
    config = json.loads((ft2 / "config.json").read_text())
    (out["layers_text"] / "config.json").write_text(json.dumps({**config, "num_hidden_layers": "four"}))
    out["empty_dir"] = root / "empty_dir"
    out["empty_dir"].mkdir()
    out["a_file"] = root / "a_file"
    out["a_file"].write_text("not a model")
    out["bad_index"] = _copy(ft2, root / "bad_index")
    (out["bad_index"] / "model.safetensors.index.json").write_text('{"weight_map": 5}')
    return out


def _validate(argv: list[str], capsys) -> tuple[int, str, str]:
    result = captured(capsys, "validate", *argv)
    return result.returncode, result.stdout, result.stderr


def _one_line_error(code: int, err: str, expected: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert expected in lines[0], lines[0]
    return lines[0]


# -- merge YAML ------------------------------------------------------------------------------------
TIES = """merge_method: ties
base_model: {base}
models:
  - model: {ft1}
    parameters: {{weight: {w1}, density: {d1}}}
  - model: {ft2}
    parameters: {{weight: 0.5, density: 0.5}}
"""


def _ties(w1="0.5", d1="0.5", ft2="ft2"):
    return lambda m: TIES.format(base=m["base"], ft1=m["ft1"], ft2=m[ft2], w1=w1, d1=d1)


def _marked(body: str):
    """A config whose <name> markers become the paths of the models fixture."""

    def make(m):
        text = body
        for name, path in m.items():
            text = text.replace(f"<{name}>", str(path))
        return text

    return make


def _text(body: str):
    return lambda m: body.format(**{k: str(v) for k, v in m.items()})


MERGE_CASES = [
    ("weight-word", _ties(w1="abc"), "models.0.parameters.weight: expected a number, got 'abc'"),
    ("weight-nan", _ties(w1=".nan"), "models.0.parameters.weight: expected a finite number"),
    ("weight-inf", _ties(w1=".inf"), "models.0.parameters.weight: expected a finite number"),
    ("weight-minus-inf", _ties(w1="-.inf"), "expected a finite number"),
    ("weight-huge-float", _ties(w1="1.0e+400"), "expected a finite number"),
    ("weight-huge-int", _ties(w1="1" + "0" * 400), "expected a finite number, got one with 401 digits"),
    ("weight-unit", _ties(w1="0.5x"), "expected a number, got '0.5x'"),
    ("weight-percent", _ties(w1="50%"), "expected a number, got '50%'"),
    ("weight-bool", _ties(w1="true"), "models.0.parameters.weight: expected a number, got true"),
    ("weight-quoted-nan", _ties(w1="'nan'"), "expected a finite number"),
    ("gradient-with-word", _ties(w1="[0.1, abc, 0.3]"), "models.0.parameters.weight.1: expected a number"),
    ("gradient-with-nan", _ties(w1="[0.1, .nan]"), "models.0.parameters.weight.1: expected a finite number"),
    ("gradient-nested", _ties(w1="[[0.1, 0.2]]"), "models.0.parameters"),
    ("gradient-empty", _ties(w1="[]"), "models.0.parameters"),
    ("weight-mapping", _ties(w1="{a: 1}"), "models.0.parameters"),
    ("weight-null", _ties(w1="null"), "models.0.parameters"),
    ("filter-value-word", _ties(w1="[{filter: mlp, value: abc}, {value: 0.5}]"), "models.0.parameters.weight.0.value"),
    ("filter-no-value", _ties(w1="[{filter: mlp}]"), "models.0.parameters"),
    ("density-negative", _ties(d1="-0.2"), "models.0.parameters.density: expected a value in [0, 1], got -0.2"),
    ("density-word", _ties(d1="half"), "models.0.parameters.density"),
    ("duplicate-parameter-key", _ties(w1="0.5, weight: 0.7"), "duplicate key 'weight'"),
    ("duplicate-top-key", lambda m: _ties()(m) + "merge_method: linear\n", "duplicate key 'merge_method'"),
    (
        "slerp-negative-t",
        _text(
            "merge_method: slerp\nbase_model: {base}\nmodels: [{{model: {base}}}, {{model: {ft1}}}]\nparameters: {{t: -0.5}}\n"
        ),
        "parameters.t: expected a value in [0, 1], got -0.5",
    ),
    (
        "slerp-t-word",
        _text(
            "merge_method: slerp\nbase_model: {base}\nmodels: [{{model: {base}}}, {{model: {ft1}}}]\nparameters: {{t: abc}}\n"
        ),
        "parameters.t: expected a number",
    ),
    (
        "slerp-t-gradient-inf",
        _text(
            "merge_method: slerp\nbase_model: {base}\nmodels: [{{model: {base}}}, {{model: {ft1}}}]\nparameters: {{t: [0, .inf]}}\n"
        ),
        "parameters.t.1: expected a finite number",
    ),
    (
        "breadcrumbs-gamma-2",
        _text(
            "merge_method: breadcrumbs\nbase_model: {base}\nmodels: [{{model: {ft1}, parameters: {{weight: 1, gamma: 2}}}}]\n"
        ),
        "models.0.parameters.gamma: expected a value in [0, 1]",
    ),
    (
        "della-negative-epsilon",
        _text(
            "merge_method: della\nbase_model: {base}\nmodels: [{{model: {ft1}, parameters: {{weight: 1, density: 0.5, epsilon: -0.1}}}}]\n"
        ),
        "models.0.parameters.epsilon: expected a value in [0, 0.5]",
    ),
    (
        "della-epsilon-too-wide-for-density",
        _text(
            "merge_method: della\nbase_model: {base}\nmodels: [{{model: {ft1}, parameters: {{weight: 1, density: 0.1, epsilon: 0.15}}}}]\n"
        ),
        "keep probabilities",
    ),
    (
        "normalize-word",
        lambda m: _ties()(m) + "parameters: {normalize: maybe}\n",
        "parameters.normalize: expected true or false, got 'maybe'",
    ),
    (
        "lambda-inf",
        lambda m: _ties()(m) + "parameters: {lambda: .inf}\n",
        "parameters.lambda: expected a finite number",
    ),
    (
        "int8-mask-2",
        lambda m: _ties()(m) + "parameters: {int8_mask: 2}\n",
        "parameters.int8_mask: expected true or false",
    ),
    ("parameters-list", lambda m: _ties()(m) + "parameters: [1, 2]\n", "parameters"),
    ("unknown-parameter", _ties(w1="0.5, wieght: 1"), "did you mean 'weight'"),
    ("unknown-top-key", lambda m: _ties()(m) + "merge_methdo: ties\n", "merge_methdo: unknown field"),
    ("method-number", _text("merge_method: 5\nmodels: [{{model: {ft1}}}]\n"), "merge_method"),
    ("method-list", _text("merge_method: [ties]\nmodels: [{{model: {ft1}}}]\n"), "merge_method"),
    ("method-unknown", _text("merge_method: tiez\nmodels: [{{model: {ft1}}}]\n"), "did you mean 'ties'"),
    ("models-string", _text("merge_method: linear\nmodels: {ft1}\n"), "models"),
    ("models-number-entry", _text("merge_method: linear\nmodels: [5]\n"), "models.0"),
    ("models-empty", _text("merge_method: linear\nmodels: []\n"), "'models' is empty"),
    (
        "layer-range-word",
        _text("merge_method: passthrough\nslices: [{{sources: [{{model: {ft1}, layer_range: [0, abc]}}]}}]\n"),
        "slices.0.sources.0.layer_range.1: expected a whole number",
    ),
    (
        "layer-range-fraction",
        _text("merge_method: passthrough\nslices: [{{sources: [{{model: {ft1}, layer_range: [0, 1.5]}}]}}]\n"),
        "expected a whole number, got 1.5",
    ),
    (
        "layer-range-bool",
        _text("merge_method: passthrough\nslices: [{{sources: [{{model: {ft1}, layer_range: [true, 2]}}]}}]\n"),
        "slices.0.sources.0.layer_range.0",
    ),
    (
        "layer-range-three",
        _text("merge_method: passthrough\nslices: [{{sources: [{{model: {ft1}, layer_range: [0, 2, 4]}}]}}]\n"),
        "slices.0.sources.0.layer_range",
    ),
    (
        "layer-range-huge",
        _text(
            "merge_method: passthrough\nslices: [{{sources: [{{model: {ft1}, layer_range: [0, 100000000000000000000000]}}]}}]\n"
        ),
        "slices.0.sources.0.layer_range.1: expected a whole number of at most",
    ),
    (
        "layer-range-past-end",
        _text("merge_method: passthrough\nslices: [{{sources: [{{model: {ft1}, layer_range: [0, 9]}}]}}]\n"),
        "outside the model's 4 layers",
    ),
    ("dtype-unknown", lambda m: _ties()(m) + "dtype: float8\n", "dtype: expected one of"),
    ("dtype-number", lambda m: _ties()(m) + "dtype: 5\n", "dtype"),
    (
        "residual-weight-word",
        _text(
            "merge_method: passthrough\nslices: [{{sources: [{{model: {ft1}, layer_range: [0, 4]}}], residual_weight: abc}}]\n"
        ),
        "slices.0.residual_weight",
    ),
    (
        "base-model-number",
        _text("merge_method: ties\nbase_model: 5\nmodels: [{{model: {ft1}, parameters: {{weight: 1}}}}]\n"),
        "base_model",
    ),
    ("tokenizer-source-missing", lambda m: _ties()(m) + "tokenizer_source: /nonexistent/model\n", "tokenizer_source"),
    ("top-level-list", _text("- merge_method: ties\n"), "expected a mapping"),
    ("top-level-scalar", _text("just text\n"), "expected a mapping"),
    ("empty-file", _text(""), "expected a mapping"),
    ("only-comments", _text("# nothing here\n"), "expected a mapping"),
    ("bad-indentation", _text("merge_method: ties\n models:\n- a\n"), "invalid YAML"),
    ("tab-indentation", _text("merge_method: ties\nmodels:\n\t- model: x\n"), "invalid YAML"),
    ("python-tag", _text("merge_method: !!python/object/apply:os.getcwd []\nmodels: []\n"), "invalid YAML"),
    (
        "multi-doc-duplicate-key",
        lambda m: "name: a\nname: b\nmerge_method: ties\n---\n" + _ties()(m),
        "duplicate key 'name'",
    ),
    # input models
    ("model-truncated", _ties(ft2="truncated"), "truncated file"),
    ("model-garbage-header", _ties(ft2="garbage_header"), "not a safetensors file"),
    ("model-bad-offsets", _ties(ft2="bad_offsets"), "the header gives"),
    ("model-nan", _ties(ft2="nan"), "model.layers.1.mlp.up_proj.weight holds NaN or Inf"),
    ("model-inf", _ties(ft2="inf"), "model.norm.weight holds NaN or Inf"),
    ("model-hidden-size", _ties(ft2="hidden48"), "different model sizes"),
    ("model-missing-tensor", _ties(ft2="missing"), "lacks ['self_attn.k_proj.weight']"),
    ("model-no-config", _ties(ft2="no_config"), "no config.json"),
    ("model-bad-config", _ties(ft2="bad_config"), "invalid JSON"),
    ("model-list-config", _ties(ft2="list_config"), "expected a JSON object"),
    ("model-layers-text", _ties(ft2="layers_text"), "num_hidden_layers: expected a whole number"),
    ("model-empty-dir", _ties(ft2="empty_dir"), "no config.json"),
    ("model-a-file", _ties(ft2="a_file"), "is not a local directory"),
    ("model-bad-index", _ties(ft2="bad_index"), "expected a 'weight_map'"),
    ("model-pickle-without-flag", _ties(ft2="pickle_blocked"), "only pickle weights"),
    # more classes: models and methods that do not fit, parameters of other methods, document rules
    (
        "hub-id",
        _marked("merge_method: linear\nmodels: [{model: org/name, parameters: {weight: 1}}]\n"),
        "looks like a hub id",
    ),
    (
        "slice-no-sources",
        _marked("merge_method: passthrough\nslices: [{sources: []}]\n"),
        "slices.0: a slice needs at least one source",
    ),
    (
        "layer-range-reversed",
        _marked("merge_method: passthrough\nslices: [{sources: [{model: <ft1>, layer_range: [2, 1]}]}]\n"),
        "0 <= start < end",
    ),
    (
        "same-model-twice",
        _marked(
            "merge_method: linear\nmodels: [{model: <ft1>, parameters: {weight: 1}}, {model: <ft1>, parameters: {weight: 1}}]\n"
        ),
        "listed twice",
    ),
    (
        "tokenizer-union-without-tokenizer",
        _marked("merge_method: linear\nmodels: [{model: <ft1>, parameters: {weight: 1}}]\ntokenizer_source: union\n"),
        "tokenizer_source: '",  # the random family has no tokenizer files
    ),
    (
        "tokenizer-both-forms",
        _marked("merge_method: linear\nmodels: [{model: <ft1>}]\ntokenizer_source: base\ntokenizer: {source: union}\n"),
        "either 'tokenizer:' or 'tokenizer_source'",
    ),
    (
        "tokenizer-token-both-ids",
        _marked(
            "merge_method: linear\nmodels: [{model: <ft1>}]\n"
            "tokenizer: {tokens: {x: {source: {kind: model_token, model: <ft1>, token: a, token_id: 1}}}}\n"
        ),
        "tokenizer.tokens.x.source",
    ),
    (
        "tokenizer-pad-zero",
        _marked("merge_method: linear\nmodels: [{model: <ft1>}]\ntokenizer: {pad_to_multiple_of: 0}\n"),
        "tokenizer.pad_to_multiple_of: expected a whole number >= 1",
    ),
    (
        "tokenizer-source-missing-model",
        _marked("merge_method: linear\nmodels: [{model: <ft1>}]\ntokenizer: {source: /nonexistent/model}\n"),
        "tokenizer.source",
    ),
    (
        "slerp-three-models",
        _marked(
            "merge_method: slerp\nbase_model: <base>\nmodels: [{model: <base>}, {model: <ft1>}, {model: <ft2>}]\nparameters: {t: 0.5}\n"
        ),
        "slerp takes exactly 2 models",
    ),
    (
        "model-stock-one",
        _marked("merge_method: model_stock\nbase_model: <base>\nmodels: [{model: <ft1>}]\n"),
        "at least 3 models",
    ),
    (
        "passthrough-weight",
        _marked("merge_method: passthrough\nmodels: [{model: <ft1>, parameters: {weight: 1}}]\n"),
        "passthrough has no parameter 'weight'",
    ),
    (
        "nuslerp-weight-word",
        _marked(
            "merge_method: nuslerp\nmodels: [{model: <ft1>, parameters: {weight: abc}}, {model: <ft2>, parameters: {weight: 1}}]\n"
        ),
        "models.0.parameters.weight: expected a number",
    ),
    (
        "nuslerp-row-wise-word",
        _marked(
            "merge_method: nuslerp\nmodels: [{model: <ft1>, parameters: {weight: 1}}, {model: <ft2>, parameters: {weight: 1}}]\nparameters: {nuslerp_row_wise: sometimes}\n"
        ),
        "parameters.nuslerp_row_wise: expected true or false",
    ),
    (
        "passthrough-scale-inf",
        _marked("merge_method: passthrough\nmodels: [{model: <ft1>, parameters: {scale: .inf}}]\n"),
        "models.0.parameters.scale: expected a finite number",
    ),
    (
        "filter-star-gradient-word",
        _marked(
            "merge_method: linear\nmodels: [{model: <ft1>, parameters: {weight: [{filter: '*', value: [0, abc]}]}}]\n"
        ),
        "models.0.parameters.weight.0.value.1",
    ),
    (
        "chat-template",
        _marked("merge_method: linear\nmodels: [{model: <ft1>, parameters: {weight: 1}}]\nchat_template: x\n"),
        "chat_template",
    ),
    (
        "model-unknown-key",
        _marked("merge_method: linear\nmodels: [{model: <ft1>, parameters: {weight: 1}, extra: 2}]\n"),
        "models.0.extra: unknown field",
    ),
    (
        "parameter-key-number",
        _marked("merge_method: linear\nmodels: [{model: <ft1>, parameters: {1: 0.5}}]\n"),
        "models.0.parameters.1",
    ),
    ("deep-nesting", _marked("merge_method: linear\nmodels: " + "[" * 5000 + "]" * 5000 + "\n"), "models.0"),
    (
        "anchor-unknown-key",
        _marked("merge_method: linear\np: &p {weight: 1}\nmodels: [{model: <ft1>, parameters: *p}]\n"),
        "p: unknown field",
    ),
    ("weight-missing", _marked("merge_method: linear\nmodels: [{model: <ft1>}]\n"), "linear needs parameter 'weight'"),
    (
        "slerp-without-t",
        _marked("merge_method: slerp\nbase_model: <base>\nmodels: [{model: <base>}, {model: <ft1>}]\n"),
        "slerp needs parameter 't'",
    ),
    (
        "ties-without-base",
        _marked("merge_method: ties\nmodels: [{model: <ft1>, parameters: {weight: 1}}]\n"),
        "ties needs a base_model",
    ),
    (
        "multi-last-named",
        _marked(
            "name: a\nmerge_method: linear\nmodels: [{model: <ft1>, parameters: {weight: 1}}]\n---\nname: b\nmerge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}]\n"
        ),
        "document 2: the last document is the output",
    ),
    (
        "multi-nan-in-second",
        _marked(
            "name: a\nmerge_method: linear\nmodels: [{model: <ft1>, parameters: {weight: 1}}]\n---\nmerge_method: linear\nmodels: [{model: a, parameters: {weight: .nan}}]\n"
        ),
        "models.0.parameters.weight: expected a finite number",
    ),
    (
        "multi-unnamed-first",
        _marked(
            "merge_method: linear\nmodels: [{model: <ft1>, parameters: {weight: 1}}]\n---\nmerge_method: linear\nmodels: [{model: <ft2>, parameters: {weight: 1}}]\n"
        ),
        "document 1: every document but the last needs a 'name'",
    ),
]


@pytest.mark.parametrize("case", MERGE_CASES, ids=[c[0] for c in MERGE_CASES])
def test_malformed_merge_config_is_one_line(case, models, tmp_path, capsys):
    _, make, expected = case
    path = tmp_path / "merge.yml"
    path.write_text(make(models))
    code, _, err = _validate([str(path)], capsys)
    _one_line_error(code, err, expected)


def test_blocked_pickle_under_allow_pickle_is_one_line(models, tmp_path, capsys):
    path = tmp_path / "merge.yml"
    path.write_text(_ties(ft2="pickle_blocked")(models))
    code, _, err = _validate([str(path), "--allow-pickle"], capsys)
    _one_line_error(code, err, "refused or unreadable by torch's weights-only loader")


@pytest.mark.parametrize(
    "content",
    [b"\x00\x01\x02binary\xff\xfe", b"merge_method: ties\nmodels: [\xff\xfe]\n", "merge_method: ties".encode("utf-16")],
    ids=["binary", "latin-bytes", "utf-16"],
)
def test_binary_or_undecodable_file_is_one_line(content, tmp_path, capsys):
    path = tmp_path / "merge.yml"
    path.write_bytes(content)
    code, _, err = _validate([str(path)], capsys)
    _one_line_error(code, err, "merge.yml: ")


def test_directory_or_missing_file_is_one_line(tmp_path, capsys):
    _one_line_error(*_validate([str(tmp_path)], capsys)[::2], "is a directory")
    _one_line_error(*_validate([str(tmp_path / "nope.yml")], capsys)[::2], "file not found")


def test_density_above_one_is_accepted_with_a_warning_naming_the_field(models, tmp_path, capsys, caplog):
    path = tmp_path / "merge.yml"
    path.write_text(_ties(d1="1.5")(models))
    code, out, _ = _validate([str(path)], capsys)
    assert code == 0 and ": ok (" in out
    warnings = [r.getMessage() for r in caplog.records if r.getMessage().startswith("warning:")]
    assert len(warnings) == 1
    assert "models.0.parameters.density: 1.5 is above 1" in warnings[0]


def test_numeric_strings_are_numbers_and_interpolate(models, tmp_path):
    """YAML 1.1 reads `1e-3` as a string; mergekit takes it as a number, and so do we (gradients too)."""
    from evomerge.config.mergekit_yaml import load_merge_config
    from evomerge.merge.planner import plan_merge

    path = tmp_path / "merge.yml"
    path.write_text(_ties(w1="[1e-3, '1']")(models))
    plan = plan_merge(load_merge_config(path), config_path=path)
    weights = [r.model_params[0]["weight"] for r in plan.tensors if r.name.endswith("layers.1.mlp.up_proj.weight")]
    assert weights == [pytest.approx(1e-3 + (1 - 1e-3) / 3)]


# -- search space files ----------------------------------------------------------------------------
def _space(family: dict[str, Path], folder: Path, **sections: str) -> str:
    parts = {
        "models": f"models: [ft1@{family['ft1']}, ft2@{family['ft2']}]\nbase_model: base@{family['base']}\n",
        "genome": "genome: {layer_granularity: 2, methods: [task_arithmetic, ties]}\n",
        "objectives": "objectives:\n  - {task: demo_close, metric: 'acc,none'}\n",
        "eval": f"eval: {{include_paths: [{TASKS}], limit: 4}}\n",
        "search": f"search: {{n_trials: 3, storage: 'sqlite:///{folder}/study.db'}}\n",
    }
    parts.update(sections)
    return "".join(parts.values())


def _fill(text: str, names: dict[str, str]) -> str:
    for name, value in names.items():
        text = text.replace(f"<{name}>", value)
    return text


SPACE_CASES = [
    (
        "objective-weight-nan",
        {"objectives": "objectives: [{task: demo_close, weight: .nan}]\n"},
        "objectives.0.weight: expected a finite number",
    ),
    (
        "objective-weight-word",
        {"objectives": "objectives: [{task: demo_close, weight: heavy}]\n"},
        "objectives.0.weight: expected a number",
    ),
    (
        "objective-direction",
        {"objectives": "objectives: [{task: demo_close, direction: max}]\n"},
        "objectives.0.direction",
    ),
    (
        "unknown-task",
        {"objectives": "objectives: [{task: demo_clsoe}]\n"},
        "objectives.0.task: unknown lm-eval task 'demo_clsoe'",
    ),
    (
        "unknown-selection-task",
        {"objectives": "objectives: [{task: demo_close, selection_task: demo_nope}]\n"},
        "objectives.0.selection_task: unknown lm-eval task",
    ),
    (
        "unknown-metric",
        {"objectives": "objectives: [{task: demo_close, metric: 'accuracy,none'}]\n"},
        "objectives.0.metric: task 'demo_close' reports no metric 'accuracy,none'",
    ),
    (
        "metric-without-filter",
        {"objectives": "objectives: [{task: demo_close, metric: acc}]\n"},
        "did you mean 'acc,none'",
    ),
    (
        "task-and-its-group",
        {"objectives": "objectives: [{task: demo_close, name: a}, {task: demo, name: b}]\n"},
        "objectives",
    ),
    (
        "eval-limit-negative",
        {"eval": f"eval: {{include_paths: [{TASKS}], limit: -1}}\n"},
        "eval.limit: expected a whole number of items",
    ),
    ("eval-limit-zero", {"eval": f"eval: {{include_paths: [{TASKS}], limit: 0}}\n"}, "eval.limit"),
    ("eval-limit-fraction-above-one", {"eval": f"eval: {{include_paths: [{TASKS}], limit: 2.5}}\n"}, "eval.limit"),
    ("eval-limit-word", {"eval": f"eval: {{include_paths: [{TASKS}], limit: all}}\n"}, "eval.limit: expected a number"),
    (
        "eval-selection-limit-nan",
        {"eval": f"eval: {{include_paths: [{TASKS}], selection_limit: .nan}}\n"},
        "eval.selection_limit",
    ),
    ("eval-fewshot-negative", {"eval": f"eval: {{include_paths: [{TASKS}], num_fewshot: -1}}\n"}, "eval.num_fewshot"),
    (
        "eval-fewshot-word",
        {"eval": f"eval: {{include_paths: [{TASKS}], num_fewshot: two}}\n"},
        "eval.num_fewshot: expected a whole number",
    ),
    ("eval-batch-size-zero", {"eval": f"eval: {{include_paths: [{TASKS}], batch_size: 0}}\n"}, "eval.batch_size"),
    (
        "eval-batch-size-bool",
        {"eval": f"eval: {{include_paths: [{TASKS}], batch_size: true}}\n"},
        "eval.batch_size: expected a whole number",
    ),
    ("eval-max-length-zero", {"eval": f"eval: {{include_paths: [{TASKS}], max_length: 0}}\n"}, "eval.max_length"),
    (
        "eval-seed-fraction",
        {"eval": f"eval: {{include_paths: [{TASKS}], seed: 1.5}}\n"},
        "eval.seed: expected a whole number",
    ),
    ("eval-include-string", {"eval": f"eval: {{include_paths: {TASKS}}}\n"}, "eval.include_paths"),
    (
        "eval-model-args-own",
        {"eval": f"eval: {{include_paths: [{TASKS}], model_args: {{batch_size: 4}}}}\n"},
        "eval.model_args.batch_size",
    ),
    ("gene-infinite-bound", {"genome": "genome: {weight: [0, .inf]}\n"}, "genome.weight: expected a finite number"),
    ("gene-nan-bound", {"genome": "genome: {weight: [.nan, 1]}\n"}, "genome.weight: expected a finite number"),
    ("gene-word-bound", {"genome": "genome: {density: [0.2, high]}\n"}, "genome.density: expected a number"),
    ("gene-bool", {"genome": "genome: {weight: true}\n"}, "genome.weight: expected a number"),
    ("gene-three-bounds", {"genome": "genome: {weight: [0, 0.5, 1]}\n"}, "genome.weight"),
    (
        "gene-density-above-one",
        {"genome": "genome: {density: [0.2, 1.5]}\n"},
        "genome.density: values must lie in [0, 1]",
    ),
    (
        "gene-t-negative",
        {"genome": "genome: {methods: [slerp], t: [-0.5, 1]}\n"},
        "genome.t: values must lie in [0, 1]",
    ),
    ("gene-lambda-unit", {"genome": "genome: {lambda: 1.0x}\n"}, "genome.lambda"),
    (
        "granularity-word",
        {"genome": "genome: {layer_granularity: two}\n"},
        "genome.layer_granularity: expected a whole number",
    ),
    ("granularity-not-dividing", {"genome": "genome: {layer_granularity: 3}\n"}, "genome.layer_granularity"),
    (
        "filter-matches-nothing",
        {"genome": "genome: {filters: [self_atention]}\n"},
        "genome.filters.0: filter 'self_atention' matches no tensor",
    ),
    ("methods-string", {"genome": "genome: {methods: ties}\n"}, "genome.methods"),
    ("n-trials-word", {"search": "search: {n_trials: many}\n"}, "search.n_trials: expected a whole number"),
    ("n-trials-negative", {"search": "search: {n_trials: -3}\n"}, "search.n_trials"),
    ("n-trials-bool", {"search": "search: {n_trials: true}\n"}, "search.n_trials: expected a whole number"),
    ("n-trials-fraction", {"search": "search: {n_trials: 2.5}\n"}, "search.n_trials"),
    (
        "n-trials-huge",
        {"search": "search: {n_trials: 100000000000000000000000}\n"},
        "search.n_trials: expected a whole number of at most",
    ),
    ("timeout-inf", {"search": "search: {timeout: .inf}\n"}, "search.timeout: expected a finite number"),
    ("timeout-units", {"search": "search: {timeout: 10min}\n"}, "search.timeout: expected a number"),
    ("seed-too-large", {"search": "search: {n_trials: 2, seed: 99999999999}\n"}, "search.seed"),
    ("workers-word", {"search": "search: {n_trials: 2, workers: two}\n"}, "search.workers"),
    (
        "sampler-option-unknown",
        {"search": "search: {n_trials: 2, storage: 'sqlite:///<tmp>/s.db', sampler_options: {n_startup_trails: 3}}\n"},
        "search.sampler_options.n_startup_trails: the tpe sampler takes no option 'n_startup_trails'",
    ),
    (
        "sampler-option-type",
        {
            "search": "search: {n_trials: 2, storage: 'sqlite:///<tmp>/s.db', sampler_options: {n_startup_trials: ten}}\n"
        },
        "search.sampler_options.n_startup_trials: expected a whole number",
    ),
    (
        "sampler-option-seed",
        {"search": "search: {n_trials: 2, storage: 'sqlite:///<tmp>/s.db', sampler_options: {seed: 3}}\n"},
        "search.seed",
    ),
    ("sampler-options-list", {"search": "search: {n_trials: 2, sampler_options: [1]}\n"}, "search.sampler_options"),
    (
        "storage-not-url",
        {"search": "search: {n_trials: 2, storage: not a url}\n"},
        "search.storage: storage not a url: not a database URL",
    ),
    ("storage-unknown-dialect", {"search": "search: {n_trials: 2, storage: 'nosuchdb://x/y'}\n"}, "search.storage"),
    (
        "storage-missing-folder",
        {"search": "search: {n_trials: 2, storage: 'sqlite:////nonexistent/dir/x.db'}\n"},
        "search.storage: storage sqlite:////nonexistent/dir/x.db: the folder /nonexistent/dir does not exist",
    ),
    (
        "storage-garbage-file",
        {"search": "search: {n_trials: 2, storage: 'sqlite:///<tmp>/garbage.db'}\n"},
        "is not a SQLite database",
    ),
    (
        "storage-unreachable-server",
        {"search": "search: {n_trials: 2, storage: 'postgresql+psycopg://u@127.0.0.1:9/db'}\n"},
        "cannot connect",
    ),
    (
        "ray-cpus-nan",
        {"search": "search: {n_trials: 2}\nray: {num_cpus_per_worker: .nan}\n"},
        "ray.num_cpus_per_worker: expected a finite number",
    ),
    ("models-number", {"models": "models: [5]\nbase_model: base@<base>\n"}, "models.0"),
    ("models-string", {"models": "models: ft1\n"}, "models"),
    ("model-nan-source", {"models": "models: [ft1@<ft1>, ft2@<nan>]\nbase_model: base@<base>\n"}, "models.1: "),
    (
        "model-truncated-source",
        {"models": "models: [ft1@<ft1>, ft2@<truncated>]\nbase_model: base@<base>\n"},
        "truncated file",
    ),
    (
        "model-hidden-size-source",
        {"models": "models: [ft1@<ft1>, ft2@<hidden48>]\nbase_model: base@<base>\n"},
        "different model sizes",
    ),
    (
        "model-missing-tensor-source",
        {"models": "models: [ft1@<ft1>, ft2@<missing>]\nbase_model: base@<base>\n"},
        "/missing: lacks ['model.layers.2.self_attn.k_proj.weight']",
    ),
    ("duplicate-key", {"search": "search: {n_trials: 2, n_trials: 3}\n"}, "duplicate key 'n_trials'"),
    ("unknown-key", {"search": "search: {n_trials: 2, n_trails: 3}\n"}, "search.n_trails: unknown field"),
    ("dtype-unknown", {"search": "search: {n_trials: 2}\ndtype: fp8\n"}, "dtype: expected one of"),
    ("eval-null", {"eval": "eval: null\n"}, "eval: Input should be a valid dictionary"),
    ("objectives-strings", {"objectives": "objectives: [demo_close]\n"}, "objectives.0"),
    (
        "objectives-mapping",
        {"objectives": "objectives: {task: demo_close}\n"},
        "objectives: Input should be a valid list",
    ),
    ("genome-list", {"genome": "genome: []\n"}, "genome: Input should be a valid dictionary"),
    (
        "model-dict-without-path",
        {"models": "models: [{name: a}]\nbase_model: base@<base>\n"},
        "models.0: expected 'name@path'",
    ),
    ("model-dict-path-number", {"models": "models: [{name: a, path: 5}]\nbase_model: base@<base>\n"}, "models.0"),
    ("base-model-list", {"models": "models: [ft1@<ft1>]\nbase_model: [x]\n"}, "base_model"),
    ("enqueue-unknown", {"search": "search: {n_trials: 2, enqueue: [all]}\n"}, "search.enqueue.0"),
    ("study-name-number", {"search": "search: {n_trials: 2, study_name: 5}\n"}, "search.study_name"),
    ("model-args-list", {"eval": "eval: {model_args: [1]}\n"}, "eval.model_args"),
    ("task-number", {"objectives": "objectives: [{task: 5}]\n"}, "objectives.0.task"),
    ("filter-number", {"genome": "genome: {filters: [5]}\n"}, "genome.filters.0"),
    ("filter-empty", {"genome": "genome: {filters: ['']}\n"}, "genome.filters.0: filter '' matches no tensor"),
    ("genome-normalize-word", {"genome": "genome: {normalize: maybe}\n"}, "genome.normalize"),
    ("device-number", {"search": "search: {n_trials: 2}\ndevice: 5\n"}, "device"),
    (
        "device-cuda-absent",
        {"search": "search: {n_trials: 2, storage: 'sqlite:///<tmp>/s.db'}\ndevice: 'cuda:99'\n"},
        "device: cuda:99 is not on this machine",
    ),
    ("metric-empty", {"objectives": "objectives: [{task: demo_close, metric: ''}]\n"}, "objectives.0.metric"),
    ("eval-limit-overflow", {"eval": "eval: {limit: 1.0e+400}\n"}, "eval.limit: expected a finite number"),
    ("timeout-negative", {"search": "search: {timeout: -5}\n"}, "search.timeout"),
    (
        "cmaes-sigma-word",
        {
            "search": "search: {n_trials: 2, sampler: cmaes, storage: 'sqlite:///<tmp>/s.db', sampler_options: {sigma0: abc}}\n"
        },
        "search.sampler_options.sigma0: expected a number",
    ),
    (
        "nsga-mutation-prob-word",
        {
            "search": "search: {n_trials: 2, sampler: nsga2, storage: 'sqlite:///<tmp>/s.db', sampler_options: {mutation_prob: lots}}\n"
        },
        "search.sampler_options.mutation_prob: expected a number",
    ),
    (
        "nsga-population-one",
        {
            "search": "search: {n_trials: 2, sampler: nsga2, storage: 'sqlite:///<tmp>/s.db', sampler_options: {population_size: 1}}\n"
        },
        "search.sampler_options: invalid option for the nsga2 sampler",
    ),
    (
        "tpe-callable-option",
        {
            "search": "search: {n_trials: 2, storage: 'sqlite:///<tmp>/s.db', sampler_options: {constraints_func: abc}}\n"
        },
        "takes a Python object",
    ),
    (
        "storage-folder",
        {"search": "search: {n_trials: 2, storage: 'sqlite:///<tmp>'}\n"},
        "is a folder; name a database file",
    ),
    ("storage-number", {"search": "search: {n_trials: 2, storage: 5}\n"}, "search.storage"),
    (
        "include-path-missing",
        {"eval": "eval: {include_paths: [/nonexistent/tasks]}\n"},
        "eval.include_paths.0: /nonexistent/tasks does not exist",
    ),
    (
        "include-path-file",
        {"eval": "eval: {include_paths: [<tmp>/garbage.db]}\n"},
        "eval.include_paths.0: <tmp>/garbage.db is not a folder",
    ),
]


@pytest.mark.parametrize("case", SPACE_CASES, ids=[c[0] for c in SPACE_CASES])
def test_malformed_space_file_is_one_line(case, models, tmp_path, capsys):
    _, sections, expected = case
    (tmp_path / "garbage.db").write_bytes(b"this is not a database" * 100)
    names = {**{k: str(v) for k, v in models.items()}, "tmp": str(tmp_path)}
    text = _space(models, tmp_path, **{key: _fill(value, names) for key, value in sections.items()})
    path = tmp_path / "space.yml"
    path.write_text(text)
    code, _, err = _validate([str(path)], capsys)
    _one_line_error(code, err, _fill(expected, names))
    assert not (tmp_path / "study.db").exists() and not (tmp_path / "s.db").exists()  # validate creates nothing


def test_a_good_space_file_passes_every_check(models, tmp_path, capsys):
    path = tmp_path / "space.yml"
    path.write_text(_space(models, tmp_path))
    code, out, err = _validate([str(path)], capsys)
    assert code == 0, err
    assert "NaN/Inf scan: 3 models" in out and "tasks: 1 load" in out and ": ok (search space" in out
    assert not (tmp_path / "study.db").exists()


def test_eval_max_length_too_short_for_the_answers(demo_family, tmp_path, capsys):
    """lm-eval asserts when an answer is longer than max_length: every evaluation would fail."""
    root = demo_family.root
    text = (
        f"models: [close@{root / 'close'}]\nbase_model: base@{root / 'base'}\n"
        f"objectives: [{{task: demo_close}}]\neval: {{include_paths: [{TASKS}], limit: 5, max_length: 3}}\n"
        f"search: {{n_trials: 2, storage: 'sqlite:///{tmp_path}/s.db'}}\n"
    )
    path = tmp_path / "space.yml"
    path.write_text(text)
    code, _, err = _validate([str(path)], capsys)
    _one_line_error(code, err, "eval.max_length: 3 tokens cannot hold the answers of task 'demo_close'")
    path.write_text(text.replace("max_length: 3", "max_length: 32"))
    code, out, err = _validate([str(path)], capsys)
    assert code == 0, err
    assert "eval.max_length 32 holds the longest answer" in out


def test_run_refuses_before_loading_models_or_creating_the_study(models, tmp_path):
    """`run` does the same checks first: an unknown metric stops it before any pool or database exists."""
    from evomerge.config.space import load_space
    from evomerge.errors import ConfigError
    from evomerge.search.runner import run_search

    path = tmp_path / "space.yml"
    path.write_text(_space(models, tmp_path, objectives="objectives: [{task: demo_close, metric: 'f1,none'}]\n"))
    with pytest.raises(ConfigError, match="objectives.0.metric"):
        run_search(load_space(path), progress=False)
    assert not (tmp_path / "study.db").exists()


# -- the real console script ---------------------------------------------------------------------
def test_console_script_prints_one_line_and_exits_2(models, tmp_path):
    """A sample of the classes above through the installed `evomerge` entry point, as a user runs it."""
    binary = tmp_path / "binary.yml"
    binary.write_bytes(b"\x00\x01binary\xff")
    weight = tmp_path / "weight.yml"
    weight.write_text(_ties(w1="[0.1, abc]")(models))
    space = tmp_path / "space.yml"
    space.write_text(_space(models, tmp_path, eval=f"eval: {{include_paths: [{TASKS}], limit: -1}}\n"))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    installed = Path(sys.executable).parent / "evomerge"
    script = [str(installed)] if installed.exists() else [sys.executable, "-c", "from evomerge.cli import main; main()"]
    duplicate = tmp_path / "duplicate.yml"
    duplicate.write_text(_ties(w1="0.5, weight: 0.7")(models))
    truncated = tmp_path / "truncated.yml"
    truncated.write_text(_ties(ft2="truncated")(models))
    expected = {
        binary: "is a binary file",
        weight: "models.0.parameters.weight.1: expected a number, got 'abc'",
        space: "eval.limit: expected a whole number of items",
        duplicate: "duplicate key 'weight'",
        truncated: "truncated file",
    }
    for path, message in expected.items():
        result = subprocess.run([*script, "validate", str(path)], capture_output=True, text=True, env=env, timeout=120)
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
        assert result.stderr.startswith("error: ") and message in result.stderr, result.stderr
    # accepted on purpose, with one warning line naming the field, and the merge is written
    lenient = tmp_path / "lenient.yml"
    lenient.write_text(_ties(d1="1.5")(models))
    result = subprocess.run(
        [*script, "merge", str(lenient), str(tmp_path / "out"), "-q"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"warning: {lenient}: models.0.parameters.density: 1.5 is above 1; it keeps every entry, as density 1 does (mergekit accepts it too)"
    ], result.stderr
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_allow_pickle_with_a_safetensors_donor_loads(demo_family, tmp_path):
    """allow_pickle adds *.bin as a fallback; it must not demand *.bin from a safetensors model."""
    from evomerge.config.space import parse_space
    from evomerge.workers.candidate import CandidateWorker

    root = demo_family.root
    data = {
        "models": [f"close@{root / 'close'}"],
        "base_model": f"base@{root / 'base'}",
        "allow_pickle": True,
        "device": "cpu",
        "objectives": [{"task": "demo_close"}],
        "eval": {"include_paths": [str(TASKS)], "limit": 2},
        "search": {"n_trials": 1, "storage": f"sqlite:///{tmp_path}/s.db"},
    }
    worker = CandidateWorker(parse_space(data, base_dir=tmp_path))
    assert worker.model is not None and worker.model.config.num_hidden_layers == 4


def test_an_evaluator_without_per_item_scores_or_margins_is_a_one_line_error(demo_family, tmp_path):
    """Successive halving and `order: margin` need more of an evaluator than `evaluate`: say which field."""
    from evomerge.config.space import parse_space
    from evomerge.workers.candidate import CandidateWorker

    root = demo_family.root
    data = {
        "models": [f"close@{root / 'close'}"],
        "base_model": f"base@{root / 'base'}",
        "device": "cpu",
        "objectives": [{"task": "demo_close"}],
        "eval": {"include_paths": [str(TASKS)], "limit": 2, "fidelity": {"rungs": [1], "order": "margin"}},
        "search": {"n_trials": 1, "storage": f"sqlite:///{tmp_path}/s.db"},
    }
    worker = CandidateWorker(parse_space(data, base_dir=tmp_path))
    worker.search_evaluator = type("ScoresOnly", (), {"evaluate": lambda self, model, items=None: {}})()
    with pytest.raises(ConfigError) as caught:
        worker.item_ids("search")
    assert "eval.fidelity" in str(caught.value) and "scores single items" in str(caught.value)
    with pytest.raises(ConfigError) as caught:
        worker.score_reference_margins("close", "search", {"demo_close": "acc,none"})
    message = str(caught.value)
    assert "eval.fidelity.order" in message and "answer margins" in message and "use order: random" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "value, integer, expected",
    [
        (0.5, False, 0.5),
        (3, False, 3.0),
        ("1e-3", False, 1e-3),
        (" -2.5 ", False, -2.5),
        ("1_000", True, 1000),
        (4.0, True, 4),
        ("7", True, 7),
        (-3, True, -3),
        (True, False, "got true (a boolean)"),
        (None, False, "got nothing (null)"),
        ([1], False, "got a list [1]"),
        ({"a": 1}, False, "got a mapping"),
        ("abc", False, "got 'abc'"),
        ("0.5x", False, "got '0.5x'"),
        ("nan", False, "finite"),
        ("-inf", False, "finite"),
        (float("nan"), False, "finite"),
        (float("-inf"), False, "finite"),
        (10**400, False, "401 digits"),
        (2.5, True, "a whole number, got 2.5"),
        ("2.5", True, "whole number"),
        (2**64, True, "at most"),
        (1e300, True, "at most"),
    ],
)
def test_one_coercion_of_numbers(value, integer, expected):
    from evomerge.config.numbers import coerce_number

    if isinstance(expected, str):
        with pytest.raises(ValueError, match=expected.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
            coerce_number(value, integer=integer)
    else:
        result = coerce_number(value, integer=integer)
        assert result == expected and type(result) is (int if integer else float)


def test_one_declared_range_serves_both_file_kinds(models, tmp_path, capsys):
    """epsilon's declared range [0, 0.5] refuses 0.6 in a merge YAML and in a space file's gene range."""
    merge = tmp_path / "merge.yml"
    merge.write_text(
        f"merge_method: della\nbase_model: {models['base']}\nmodels: [{{model: {models['ft1']}, parameters: {{weight: 1, epsilon: 0.6}}}}]\n"
    )
    space = tmp_path / "space.yml"
    space.write_text(_space(models, tmp_path, genome="genome: {methods: [della], epsilon: [0.1, 0.6]}\n"))
    merge_line = _one_line_error(
        *_validate([str(merge)], capsys)[::2], "models.0.parameters.epsilon: expected a value in [0, 0.5]"
    )
    space_line = _one_line_error(*_validate([str(space)], capsys)[::2], "genome.epsilon: values must lie in [0, 0.5]")
    assert "della keeps entries with probability density +- epsilon" in merge_line + space_line


def test_a_group_task_reports_its_aggregate_metric(models, tmp_path, capsys):
    """A group (demo_select) reports the metrics its aggregate_metric_list names, with its leaves' filters."""
    path = tmp_path / "space.yml"
    path.write_text(_space(models, tmp_path, objectives="objectives: [{task: demo_select, metric: 'acc,none'}]\n"))
    code, out, err = _validate([str(path)], capsys)
    assert code == 0, err
    path.write_text(_space(models, tmp_path, objectives="objectives: [{task: demo_select, metric: 'acc_norm,none'}]\n"))
    _one_line_error(
        *_validate([str(path)], capsys)[::2],
        "objectives.0.metric: task 'demo_select' reports no metric 'acc_norm,none' (it reports: acc,none)",
    )


def test_validate_plans_a_multi_document_file_against_the_parts_it_makes(models, tmp_path, capsys):
    """A later document is checked against what an earlier named part will hold (here 6 layers, not 4)."""
    part = (
        "name: big\nmerge_method: passthrough\nslices:\n"
        f"  - sources: [{{model: {models['ft1']}, layer_range: [0, 4]}}]\n"
        f"  - sources: [{{model: {models['ft2']}, layer_range: [2, 4]}}]\n---\n"
    )
    path = tmp_path / "multi.yml"
    path.write_text(part + "merge_method: passthrough\nslices: [{sources: [{model: big, layer_range: [0, 6]}]}]\n")
    code, out, err = _validate([str(path)], capsys)
    assert code == 0, err
    assert "6 layers" in out and "NaN/Inf scan: 2 models" in out, out
    path.write_text(part + "merge_method: passthrough\nslices: [{sources: [{model: big, layer_range: [0, 7]}]}]\n")
    _one_line_error(*_validate([str(path)], capsys)[::2], "layer_range [0, 7] is outside the model's 6 layers")
