"""What differing vocabularies cost: building the output vocabulary and permuting embedding rows.

A synthetic base tokenizer of V word tokens and two fine-tunes that add tokens (chat tokens, and
`--added` tool tokens of which the second fine-tune shares half); per V: the seconds to build the
union vocabulary (three tokenizers loaded, the union saved), to permute one V x H float32
embedding of the three models into it (merge/vocab.py `Vocabulary.align`), and, for scale, one
task_arithmetic merge of the aligned tensors. Writes results/vocab.md.

    .venv/bin/python benchmarks/vocab_bench.py [--vocab 32000 152064] [--hidden 512] [--out results/vocab.md]
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import machine_line  # noqa: E402

from evomerge.merge.methods import merge_tensors  # noqa: E402
from evomerge.merge.vocab import build_vocabulary  # noqa: E402


def _tokenizer(size: int):
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    words = [f"w{i}" for i in range(size - len(specials))]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(specials + words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def measure(size: int, hidden: int, added: int, folder: Path) -> dict[str, float]:
    paths = {name: folder / name for name in ("base", "a", "b")}
    _tokenizer(size).save_pretrained(paths["base"])
    a = _tokenizer(size)
    a.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    a.add_tokens([f"<tool{i}>" for i in range(added)])
    a.save_pretrained(paths["a"])
    b = _tokenizer(size)
    b.add_tokens(["<|im_end|>", *(f"<tool{i}>" for i in range(added // 2, added + added // 2))])
    b.save_pretrained(paths["b"])
    sizes = {"base": size, "a": len(a), "b": len(b)}
    started = time.perf_counter()
    vocab = build_vocabulary(
        source="union", paths=paths, vocab_sizes=sizes, models=list(paths), tokenizer_base="base", pad_to_multiple_of=64
    )
    built = time.perf_counter() - started
    generator = torch.Generator().manual_seed(0)
    tensors = [torch.randn(sizes[name], hidden, generator=generator) for name in paths]
    started = time.perf_counter()
    aligned = vocab.align(list(paths), tensors, "base")
    align_seconds = time.perf_counter() - started
    started = time.perf_counter()
    merge_tensors("task_arithmetic", aligned, ({}, {"weight": 0.5}, {"weight": 0.5}), {}, 0, seed=0)
    merge_seconds = time.perf_counter() - started
    return {"rows": vocab.size, "build": built, "align": align_seconds, "merge": merge_seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 152064])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--added", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("results/vocab.md"))
    args = parser.parse_args()
    rows = []
    for size in args.vocab:
        with tempfile.TemporaryDirectory() as tmp:
            result = measure(size, args.hidden, args.added, Path(tmp))
        rows.append(
            f"| {size} | {result['rows']} | {args.hidden} | {result['build']:.2f} | {result['align']:.3f} | {result['merge']:.3f} |"
        )
        print(rows[-1], flush=True)
    lines = [
        "# Differing vocabularies: build and permutation cost",
        "",
        f"Command: `{' '.join([Path(sys.executable).name, *sys.argv])}`",
        f"{machine_line(torch, threads=f'{torch.get_num_threads()} torch thread(s)')}; {datetime.date.today()}",
        "",
        f"Three models (base; a: 2 chat + {args.added} tool tokens; b: 1 chat + {args.added} tool tokens, half"
        " shared with a), union vocabulary padded to a multiple of 64. One float32 embedding per model.",
        "",
        "| base tokens | output rows | hidden | build vocabulary (s) | permute 3 embeddings (s) | task_arithmetic of them (s) |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        "The build runs once per merge or search; a search permutes each model set once (resident).",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
