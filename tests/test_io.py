import json

import pytest
import torch
from safetensors.torch import load_file

from evomerge.errors import EvomergeError
from evomerge.io.model_dir import ModelDir
from evomerge.io.safetensors_io import StreamingCheckpointWriter, parse_size


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(7, 5, generator=g),
        "b.weight": torch.randn(33, generator=g).to(torch.bfloat16),
        "c.weight": torch.randn(4, 4, generator=g).to(torch.float16),
        "d.index": torch.arange(6, dtype=torch.int64).reshape(2, 3),
    }


@pytest.mark.parametrize("shard_bytes", [10**9, 100, 1])
def test_writer_roundtrip_any_order(tmp_path, shard_bytes):
    tensors = _tensors()
    with StreamingCheckpointWriter(tmp_path, [(k, v.shape, v.dtype) for k, v in tensors.items()], max_shard_bytes=shard_bytes) as w:
        for name in reversed(list(tensors)):  # out of layout order
            w.write(name, tensors[name])
    loaded = {}
    for f in tmp_path.glob("*.safetensors"):
        loaded.update(load_file(f))
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor) and loaded[name].dtype == tensor.dtype
    if shard_bytes == 10**9:
        assert [p.name for p in tmp_path.glob("*.safetensors")] == ["model.safetensors"]
        assert not (tmp_path / "model.safetensors.index.json").exists()
    else:
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(tensors)
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
        assert len(set(index["weight_map"].values())) > 1
        # the reader follows the index
        (tmp_path / "config.json").write_text("{}")
        model = ModelDir(tmp_path)
        assert torch.equal(model.get("c.weight"), tensors["c.weight"])


def test_writer_refuses_incomplete_or_wrong_tensors(tmp_path):
    tensors = _tensors()
    writer = StreamingCheckpointWriter(tmp_path, [(k, v.shape, v.dtype) for k, v in tensors.items()])
    with pytest.raises(ValueError, match="layout expects"):
        writer.write("a.weight", tensors["a.weight"].double())
    writer.write("a.weight", tensors["a.weight"])
    with pytest.raises(RuntimeError, match="never written"):
        writer.close()
    assert not list(tmp_path.glob("*safetensors*"))  # nothing half-written is left behind


def test_model_dir_reads_headers_lazily(tmp_path):
    tensors = _tensors()
    with StreamingCheckpointWriter(tmp_path, [(k, v.shape, v.dtype) for k, v in tensors.items()]) as w:
        for name, tensor in tensors.items():
            w.write(name, tensor)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 2}))
    model = ModelDir(tmp_path)
    assert model.tensors["b.weight"].shape == (33,) and model.tensors["b.weight"].dtype == torch.bfloat16
    assert model.architecture == "LlamaForCausalLM" and model.num_hidden_layers == 2
    assert torch.equal(model.get("b.weight"), tensors["b.weight"])
    assert model.total_bytes == sum(t.numel() * t.element_size() for t in tensors.values())


def test_pickle_weights_need_opt_in(tmp_path):
    torch.save({"w": torch.ones(3)}, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(EvomergeError, match="--allow-pickle"):
        ModelDir(tmp_path)
    model = ModelDir(tmp_path, allow_pickle=True)
    assert torch.equal(model.get("w"), torch.ones(3))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: None, "no config.json"),
        (lambda p: (p / "config.json").write_text("{bad"), "invalid JSON"),
        (lambda p: (p / "config.json").write_text("{}"), "no weights found"),
    ],
)
def test_model_dir_errors(tmp_path, make, message):
    make(tmp_path)
    with pytest.raises(EvomergeError, match=message):
        ModelDir(tmp_path)
    with pytest.raises(EvomergeError, match="not a local model directory"):
        ModelDir(tmp_path / "missing")


def test_parse_size():
    assert parse_size("5B") == 5 * 10**9
    assert parse_size("500M") == 500 * 10**6
    assert parse_size("1.5k") == 1500
    assert parse_size(123) == 123
    with pytest.raises(EvomergeError, match="invalid size"):
        parse_size("lots")
