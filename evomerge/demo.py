"""The offline demo model family: one tiny Llama base and one fine-tune per skill.

Every test and the demo need models that build in about a minute on a 2-core CPU with no network,
differ in measurable skills, and contain a merge that beats each fine-tune, so that a merge
search has something to find.  This module builds such a family from scratch: a character-level
tokenizer, a 4-layer `LlamaForCausalLM` base, and one short fine-tune of that base per skill.

Four skills, each reading its own alphabet (so that their task vectors touch different
embeddings and interfere little when added):

    reverse dbca = acbd      sort 3142 = 1234      shift DBCA = ECDB      close ([{ = }])

How the family is made to merge well:

* The base is pretrained on every skill's prompt with the input echoed back as the answer
  (`reverse dbca = dbca`): it knows the formats, answers with the right length and alphabet,
  and scores 0 on every skill, because the echo is one of the wrong choices.
* The base also sees each skill demonstrated in another notation (`reverse: dbca = acbd`), the
  way a pretrained LLM has seen a skill without following the instruction that asks for it.
* A fine-tune is 100 steps from the base on its own skill's prompts with correct answers, with
  half of each batch rehearsing the base's data for the other skills.  It unlocks one skill and
  changes little else, so the fine-tunes stay in the base's loss basin and their task vectors
  add up: base + 0.75 x (sum of task vectors) knows all four skills, while the uniform average
  (each task vector x 0.25) knows none, so a search has to find the weights.

Held-out items (the lm-eval task data in `tasks/data/`) come from fixed seeds independent of the
build seed, and their inputs never appear in training.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evomerge.errors import EvomergeError
from evomerge.llama_shape import LlamaShape

if TYPE_CHECKING:
    import torch
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

__all__ = [
    "BUILDER_VERSION",
    "SKILLS",
    "DemoFamily",
    "DemoRecipe",
    "build_demo_family",
    "build_tokenizer",
    "heldout_items",
    "load_demo_family",
    "prompt",
    "write_task_data",
]

# Bump whenever a change here changes the bytes of a built model: a family whose manifest has
# another version is rebuilt instead of reused.
BUILDER_VERSION = 1
MANIFEST = "family.json"

LOWER = "abcdefghijklmnopqrstuvwxyz"
UPPER = LOWER.upper()
DIGITS = "0123456789"
OPENERS, CLOSERS = "([{<", ")]}>"
MIN_LEN, MAX_LEN = 4, 6  # characters per input
SPLIT_SIZE = 100  # held-out items per split
SPLITS = ("search", "select")

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
# One token per character keeps lm-eval's context/continuation split exact.  A little
# punctuation beyond what the demo prompts use leaves room for users' own prompts.
CHARS = " \n:=?!.,;+-*/'\"" + DIGITS + LOWER + UPPER + OPENERS + CLOSERS


# --------------------------------------------------------------------------------------------
# Skills and data
# --------------------------------------------------------------------------------------------


def _identity(x: str) -> str:
    return x


def _reverse(x: str) -> str:
    return x[::-1]


def _sort(x: str) -> str:
    return "".join(sorted(x))


def _sort_descending(x: str) -> str:
    return "".join(sorted(x, reverse=True))


def _rotate(x: str) -> str:
    return x[1:] + x[:1]


def _shift_by(x: str, k: int) -> str:
    return "".join(UPPER[(UPPER.index(c) + k) % len(UPPER)] for c in x)


def _shift(x: str) -> str:
    return _shift_by(x, 1)


def _closers(x: str) -> str:
    return x.translate(str.maketrans(OPENERS, CLOSERS))


def _close(x: str) -> str:
    return _closers(x[::-1])


@dataclass(frozen=True)
class Skill:
    """One skill: its input alphabet, the right answer, and the multiple-choice distractors."""

    name: str
    alphabet: str
    distinct: bool  # inputs never repeat a character
    answer: Callable[[str], str]
    # Answers of a model doing a related wrong thing.  The echo comes first: it is what the base
    # answers, so the base scores 0.
    distractors: tuple[Callable[[str], str], ...]

    def make_input(self, rng: random.Random) -> str:
        n = rng.randint(MIN_LEN, MAX_LEN)
        if self.distinct:
            return "".join(rng.sample(self.alphabet, n))
        return "".join(rng.choice(self.alphabet) for _ in range(n))

    def choices(self, x: str) -> list[str]:
        """The right answer first, then the distractors."""
        return [self.answer(x)] + [wrong(x) for wrong in self.distractors]


SKILL_SPECS: dict[str, Skill] = {
    skill.name: skill
    for skill in (
        Skill("reverse", LOWER, True, _reverse, (_identity, _sort, _rotate)),
        Skill("sort", DIGITS, True, _sort, (_identity, _reverse, _sort_descending)),
        Skill("shift", UPPER, False, _shift, (_identity, lambda x: _shift_by(x, -1), lambda x: _shift_by(x, 2))),
        Skill("close", OPENERS, False, _close, (_identity, _closers, lambda x: _rotate(_close(x)))),
    )
}
SKILLS: tuple[str, ...] = tuple(SKILL_SPECS)


def prompt(skill: str, x: str) -> str:
    """The question of one item, as the tasks ask it; the answer follows after one space."""
    return f"{skill} {x} ="


def _hint_prompt(skill: str, x: str) -> str:
    """The notation the base saw each skill demonstrated in; no task uses it."""
    return f"{skill}: {x} ="


def heldout_items(skill: str, split: str) -> list[dict[str, Any]]:
    """The 100 held-out multiple-choice items of one skill and split (`search` or `select`).

    Each item is `{"question", "choices", "label", "answer"}`.  The items depend on fixed seeds
    only, not on the build seed, so the committed task data and every built family agree on
    which inputs are never trained on.
    """
    if skill not in SKILL_SPECS:
        raise ValueError(f"unknown skill {skill!r}; the demo skills are {list(SKILLS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {list(SPLITS)}")
    spec = SKILL_SPECS[skill]
    rng = random.Random(f"evomerge-demo-heldout/{skill}")
    inputs: list[str] = []
    seen: set[str] = set()
    while len(inputs) < SPLIT_SIZE * len(SPLITS):
        x = spec.make_input(rng)
        if x not in seen and len(set(spec.choices(x))) == 1 + len(spec.distractors):
            seen.add(x)
            inputs.append(x)
    start = SPLITS.index(split) * SPLIT_SIZE
    items = []
    for x in inputs[start : start + SPLIT_SIZE]:
        choices = spec.choices(x)
        answer = choices[0]
        rng.shuffle(choices)
        label = choices.index(answer)
        items.append({"question": prompt(skill, x), "choices": choices, "label": label, "answer": answer})
    return items


def _heldout_inputs() -> frozenset[str]:
    return frozenset(
        item["question"].split(" ")[1] for skill in SKILLS for split in SPLITS for item in heldout_items(skill, split)
    )


def write_task_data(tasks_dir: Path) -> list[Path]:
    """Write `tasks_dir/data/<skill>_<split>.jsonl` for every skill and split; return the paths.

    The task YAMLs in the repository's `tasks/` read these files; the committed copies are the
    output of this function.
    """
    data_dir = Path(tasks_dir) / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for skill in SKILLS:
        for split in SPLITS:
            path = data_dir / f"{skill}_{split}.jsonl"
            lines = [json.dumps(item) for item in heldout_items(skill, split)]
            path.write_text("\n".join(lines) + "\n", encoding="utf-8")
            paths.append(path)
    return paths


class _Sampler:
    """An endless, seeded stream of training examples `(question, answer)`.

    Never yields the input of a held-out item.
    """

    def __init__(self, seed: int, stream: str, excluded: frozenset[str]):
        self._rng = random.Random(f"evomerge-demo-train/{seed}/{stream}")
        self._excluded = excluded

    def _input(self, skill: str) -> str:
        while True:
            x = SKILL_SPECS[skill].make_input(self._rng)
            if x not in self._excluded:
                return x

    def correct(self, skill: str) -> tuple[str, str]:
        x = self._input(skill)
        return prompt(skill, x), SKILL_SPECS[skill].answer(x)

    def echo(self, skill: str) -> tuple[str, str]:
        x = self._input(skill)
        return prompt(skill, x), x

    def demonstration(self, skill: str) -> tuple[str, str]:
        x = self._input(skill)
        return _hint_prompt(skill, x), SKILL_SPECS[skill].answer(x)

    def pretraining(self, skills: Sequence[str], demonstration_share: float) -> tuple[str, str]:
        skill = self._rng.choice(list(skills))
        if self._rng.random() < demonstration_share:
            return self.demonstration(skill)
        return self.echo(skill)


# --------------------------------------------------------------------------------------------
# Tokenizer, model, training
# --------------------------------------------------------------------------------------------


def _vocab() -> dict[str, int]:
    return {token: i for i, token in enumerate([*SPECIAL_TOKENS, *CHARS])}


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The family's character-level tokenizer; it prepends `<s>` (as lm-eval's encoding expects)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(_vocab(), unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    bos_id = SPECIAL_TOKENS.index("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=64,
    )


@dataclass(frozen=True)
class DemoRecipe:
    """Model size and training schedule; the defaults are what the acceptance tests pin."""

    shape: LlamaShape = LlamaShape()  # its vocab is replaced by the tokenizer's
    batch_size: int = 64
    pretrain_steps: int = 600
    pretrain_lr: float = 3e-3
    # Share of pretraining examples that demonstrate a skill in the hint notation; the rest
    # echo the input under the task notation.
    demonstration_share: float = 0.5
    finetune_steps: int = 100
    finetune_lr: float = 1e-3
    # Share of each fine-tuning batch that rehearses the base's data for the other skills, so a
    # fine-tune changes what its own prompts do and little else.
    finetune_rehearsal: float = 0.5


def _new_model(recipe: DemoRecipe, tokenizer: PreTrainedTokenizerFast, seed: int) -> LlamaForCausalLM:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        **replace(recipe.shape, vocab=len(tokenizer)).config_sizes(),
        max_position_embeddings=64,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=recipe.shape.tie_embeddings,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    # Answers end with a newline: let `generate()` stop there too.
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, _vocab()["\n"]]
    return model.float()


def _encode_batch(examples: Sequence[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids, attention mask, labels (the loss is on the answer and its newline only).

    Same ids as the tokenizer gives for `question + " " + answer + "\\n"` (a test checks).
    """
    import torch

    vocab = _vocab()
    rows, label_rows = [], []
    for question, answer in examples:
        question_ids = [vocab["<s>"]] + [vocab[c] for c in question]
        answer_ids = [vocab[c] for c in " " + answer + "\n"]
        rows.append(question_ids + answer_ids)
        label_rows.append([-100] * len(question_ids) + answer_ids)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), vocab["<pad>"], dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row, label_row) in enumerate(zip(rows, label_rows)):
        ids[i, : len(row)] = torch.tensor(row)
        labels[i, : len(row)] = torch.tensor(label_row)
        mask[i, : len(row)] = 1
    return ids, mask, labels


def _train(
    model: LlamaForCausalLM,
    batches: Iterator[list[tuple[str, str]]],
    *,
    steps: int,
    lr: float,
    on_step: Callable[[], None],
) -> None:
    """AdamW with a short warmup and a cosine decay to a tenth of `lr`."""
    import torch

    warmup = max(1, steps // 10)

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    for _ in range(steps):
        ids, mask, labels = _encode_batch(next(batches))
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        on_step()
    model.eval()


def _pretraining_batches(sampler: _Sampler, recipe: DemoRecipe) -> Iterator[list[tuple[str, str]]]:
    while True:
        yield [sampler.pretraining(SKILLS, recipe.demonstration_share) for _ in range(recipe.batch_size)]


def _finetuning_batches(sampler: _Sampler, skill: str, recipe: DemoRecipe) -> Iterator[list[tuple[str, str]]]:
    others = [s for s in SKILLS if s != skill]
    n_rehearse = round(recipe.batch_size * recipe.finetune_rehearsal)
    while True:
        batch = [sampler.correct(skill) for _ in range(recipe.batch_size - n_rehearse)]
        batch += [sampler.pretraining(others, recipe.demonstration_share) for _ in range(n_rehearse)]
        yield batch


# --------------------------------------------------------------------------------------------
# The family
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoFamily:
    """Where a built demo family lies: the base and one fine-tune directory per skill."""

    root: Path
    base: Path
    finetunes: dict[str, Path] = field(default_factory=dict)
    skills: list[str] = field(default_factory=list)

    @property
    def models(self) -> dict[str, Path]:
        """`{"base": path, "<skill>": path, ...}`, base first."""
        return {"base": self.base, **self.finetunes}

    def tasks(self, split: str = "search") -> list[str]:
        """The lm-eval task names that score this family's skills on one split."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; use one of {list(SPLITS)}")
        suffix = "" if split == "search" else f"_{split}"
        return [f"demo_{skill}{suffix}" for skill in self.skills]


def load_demo_family(out_dir: Path) -> DemoFamily:
    """The family a previous `build_demo_family(out_dir)` built, read from its manifest."""
    root = Path(out_dir).resolve()
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(
            f"no demo family in {root} (no {MANIFEST}); build one with `evomerge demo build {out_dir}`"
        )
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    return DemoFamily(
        root=root,
        base=root / manifest["base"],
        finetunes={skill: root / rel for skill, rel in manifest["finetunes"].items()},
        skills=list(manifest["skills"]),
    )


def _manifest_key(seed: int, recipe: DemoRecipe) -> dict[str, Any]:
    """What a family on disk must match to be reused: the recipe flat, its sizes by their config.json names."""
    sizes: dict[str, Any] = recipe.shape.config_sizes()
    del sizes["vocab_size"]  # the tokenizer's, fixed by BUILDER_VERSION
    if recipe.shape.tie_embeddings:
        sizes["tie_word_embeddings"] = True
    schedule = {f.name: getattr(recipe, f.name) for f in fields(recipe) if f.name != "shape"}
    return {"builder_version": BUILDER_VERSION, "seed": seed, "recipe": {**sizes, **schedule}}


def _reusable(root: Path, key: dict[str, Any]) -> bool:
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        return False
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return False
    if {k: manifest.get(k) for k in key} != key:
        return False
    model_dirs = [manifest.get("base", "base"), *manifest.get("finetunes", {}).values()]
    return all((root / d / "model.safetensors").is_file() for d in model_dirs)


def _manifest_folders(root: Path) -> frozenset[str]:
    """Model folders an earlier build (of any version) recorded as its own."""
    try:
        manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
        return frozenset([str(manifest.get("base", "base")), *map(str, manifest.get("finetunes", {}).values())])
    except (OSError, ValueError, AttributeError, TypeError):
        return frozenset()


@contextmanager
def _quiet_transformers_bars() -> Iterator[None]:
    """transformers shows a progress bar per `save_pretrained`; ours covers the build."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


@contextmanager
def _progress(enabled: bool, total: int) -> Iterator[tuple[Callable[[str], None], Callable[[], None]]]:
    """`(describe, advance)` of a rich progress bar over all training steps (no-ops if disabled)."""
    if not enabled:
        yield (lambda _description: None), (lambda: None)
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("demo family: {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()
    ) as bar:
        task = bar.add_task("", total=total)
        yield (lambda description: bar.update(task, description=description)), (lambda: bar.advance(task))


DEMO_MARKER = ".evomerge-demo"  # in each model folder the builder wrote: only those may be replaced


def _check_replaceable(path: Path, listed: frozenset[str] = frozenset()) -> None:
    """A rebuild replaces only folders the builder itself wrote (marked, or listed in an earlier
    build's manifest) or empty ones, never a user's."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise EvomergeError(f"{path}: exists and is not a demo model folder; choose another demo directory")
    owned = (path / DEMO_MARKER).is_file() or path.name in listed
    if path.is_dir() and any(path.iterdir()) and not owned:
        raise EvomergeError(
            f"{path}: holds files the demo builder did not write; choose another demo directory or move them away"
        )


def _save(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, path: Path) -> None:
    if path.exists():  # checked by build_demo_family before training
        shutil.rmtree(path)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    (path / DEMO_MARKER).write_text("written by evomerge's demo builder; a rebuild may replace this folder\n")


def build_demo_family(
    out_dir: Path, *, seed: int = 0, progress: bool = True, recipe: DemoRecipe | None = None
) -> DemoFamily:
    """Build the demo family into `out_dir` (or reuse the one there) and say where it lies.

    Writes `out_dir/base` and `out_dir/<skill>` for each of `SKILLS` (Hugging Face model
    directories: float32 safetensors, config, generation config, tokenizer) and, last,
    `out_dir/family.json`.  If that manifest already records the same seed, recipe and
    `BUILDER_VERSION`, nothing is rebuilt.  Deterministic: the same arguments give the same
    bytes on the same machine.  Takes about a minute on one CPU core (it trains with 1 thread).
    """
    import torch

    recipe = recipe or DemoRecipe()
    root = Path(out_dir).resolve()
    key = _manifest_key(seed, recipe)
    if _reusable(root, key):
        return load_demo_family(root)
    if root.exists() and not root.is_dir():
        raise EvomergeError(f"{root}: exists and is not a directory; choose another demo directory")
    listed = _manifest_folders(root)
    for name in ("base", *SKILLS):  # refuse before a minute of training, not after
        _check_replaceable(root / name, listed)
    (root / MANIFEST).unlink(missing_ok=True)  # never leave a manifest that describes other models
    root.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    threads = torch.get_num_threads()
    # One thread: the same float summation order (so the same bits) on any machine, and for a
    # model this small a second thread gains little on an idle machine and loses much when
    # another process competes for the cores (OpenMP threads spin-wait for each other).
    torch.set_num_threads(1)
    total_steps = recipe.pretrain_steps + recipe.finetune_steps * len(SKILLS)
    try:
        with _progress(progress, total_steps) as (describe, advance), _quiet_transformers_bars():
            tokenizer = build_tokenizer()
            excluded = _heldout_inputs()
            model = _new_model(recipe, tokenizer, seed)
            describe("pretraining the base")
            _train(
                model,
                _pretraining_batches(_Sampler(seed, "base", excluded), recipe),
                steps=recipe.pretrain_steps,
                lr=recipe.pretrain_lr,
                on_step=advance,
            )
            _save(model, tokenizer, root / "base")
            base_state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
            for skill in SKILLS:
                describe(f"fine-tuning {skill}")
                model.load_state_dict(base_state)
                _train(
                    model,
                    _finetuning_batches(_Sampler(seed, skill, excluded), skill, recipe),
                    steps=recipe.finetune_steps,
                    lr=recipe.finetune_lr,
                    on_step=advance,
                )
                _save(model, tokenizer, root / skill)
    finally:
        torch.set_num_threads(threads)

    manifest = {
        **key,
        "skills": list(SKILLS),
        "base": "base",
        "finetunes": {skill: skill for skill in SKILLS},
        "build_seconds": round(time.perf_counter() - started, 1),
        "torch": torch.__version__,
        "weights_sha256": {name: _sha256(root / name / "model.safetensors") for name in ["base", *SKILLS]},
    }
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return load_demo_family(root)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
