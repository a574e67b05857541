"""(context, continuation) token pairs from lm-eval tasks: each document's gold answer given its prompt.

The requests are lm-eval's own (`build_all_requests`), tokenised by HFLM's own `loglikelihood`
(evaluate.request_cache._tokenise), so a statistic sees exactly the tokens an evaluation scores.
For a multiple-choice document only the gold choice is kept: the log-likelihood the model was
fine-tuned to raise.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from evomerge.evaluate.harness import _quiet_lm_eval, load_task_dict
from evomerge.evaluate.request_cache import _tokenise

Example = tuple[list[int], list[int]]  # (context tokens, continuation tokens)


def _gold_index(task: Any, doc: Any) -> int | None:
    """The gold choice's index of a multiple-choice document (the first one if several)."""
    target = task.doc_to_target(doc)
    if isinstance(target, list):
        target = target[0] if target else None
    if isinstance(target, str):
        choices = task.doc_to_choice(doc)
        return choices.index(target) if target in choices else None
    return int(target) if target is not None else None


def gold_instances(task: Any, *, seed: int = 0, limit: int | None = None) -> list[Any]:
    """One loglikelihood instance per document (the first `limit` documents): its gold choice
    (multiple choice) or its only request; zero-shot unless the task sets its own shots."""
    if task.get_config("num_fewshot") is None:
        task.set_config(key="num_fewshot", value=0)
    task.set_fewshot_seed(seed=seed)
    task.build_all_requests(
        limit=limit, rank=0, world_size=1, apply_chat_template=False, chat_template=None, tokenizer_name=""
    )
    chosen = []
    for instance in task.instances:
        if instance.request_type != "loglikelihood":
            continue
        if task.OUTPUT_TYPE == "multiple_choice" and instance.idx != _gold_index(task, instance.doc):
            continue
        chosen.append(instance)
    return chosen


def task_examples(
    tasks: Sequence[str],
    *,
    include_paths: Sequence[Path],
    model: Any,
    tokenizer: Any,
    count: int,
    seed: int,
) -> list[Example]:
    """Up to `count` examples drawn (by `seed`) from the documents of `tasks`, tokenised for `model`.

    ValueError for an unknown task or tasks without loglikelihood requests (generation-only)."""
    from lm_eval.models.huggingface import HFLM

    task_dict = load_task_dict(tasks, include_paths)
    instances = []
    with _quiet_lm_eval(False):
        for task in task_dict["tasks"].values():
            instances.extend(gold_instances(task, seed=seed))
        if not instances:
            raise ValueError(f"tasks {', '.join(tasks)} have no loglikelihood requests to take examples from")
        random.Random(seed).shuffle(instances)
        instances = instances[:count]
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1)
        pairs = _tokenise(lm, instances)
    max_length = lm.max_length
    return [(context, continuation) for context, continuation in pairs if 0 < len(continuation) <= max_length]
