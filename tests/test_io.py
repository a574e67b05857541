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
    with StreamingCheckpointWriter(
        tmp_path, [(k, v.shape, v.dtype) for k, v in tensors.items()], max_shard_bytes=shard_bytes
    ) as w:
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
        (
            lambda p: (p / "adapter_config.json").write_text("{}"),
            r"a PEFT .LoRA. adapter, not a full model: give it with its base, as BASE\+",
        ),
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


def _header_and_data(path):
    import struct

    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def _write_with_header(path, header, body):
    import struct

    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + body)


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda h, b: (h, b[:-1]), "truncated file (tensor"),
        (lambda h, b: ({**h, "a.weight": {**h["a.weight"], "shape": [7, 6]}}, b), "its shape [7, 6] needs 168"),
        (lambda h, b: ({**h, "a.weight": {**h["a.weight"], "shape": [7, -5]}}, b), "malformed shape"),
        (lambda h, b: ({**h, "a.weight": {**h["a.weight"], "data_offsets": [8, 4]}}, b), "malformed data_offsets"),
        (lambda h, b: ({**h, "a.weight": {"dtype": "F32"}}, b), "malformed header entry"),
        (lambda h, b: ({**h, "a.weight": {**h["a.weight"], "dtype": "Q4"}}, b), "unsupported dtype Q4"),
        (lambda h, b: ([1, 2], b), "not a JSON object"),
    ],
    ids=["truncated", "span-vs-shape", "negative-dim", "offsets-reversed", "entry-keys", "dtype", "header-list"],
)
def test_safetensors_headers_are_checked_against_the_file(tmp_path, corrupt, message):
    """A broken or truncated checkpoint is refused when its header is read, before any merge starts."""
    from safetensors.torch import save_file

    from evomerge.io.model_dir import read_safetensors_header

    path = tmp_path / "model.safetensors"
    save_file(_tensors(), path)
    assert set(read_safetensors_header(path)) == set(_tensors())
    header, body = _header_and_data(path)
    _write_with_header(path, *corrupt(header, body))
    with pytest.raises(EvomergeError, match=message.replace("[", r"\[").replace("(", r"\(")):
        read_safetensors_header(path)


def test_find_non_finite_names_the_tensor(tmp_path):
    from safetensors.torch import save_file

    tensors = _tensors()
    (tmp_path / "config.json").write_text("{}")
    save_file(tensors, tmp_path / "model.safetensors")
    assert ModelDir(tmp_path).find_non_finite() is None
    tensors["c.weight"][1, 2] = float("-inf")
    save_file(tensors, tmp_path / "model.safetensors")
    assert ModelDir(tmp_path).find_non_finite() == "c.weight"
