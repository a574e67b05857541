"""How sure a model is of each item's answer: its answer margin.

For a multiple-choice item the margin is the log-likelihood of the best gold choice minus that of
the best wrong one, read the way lm-eval's `process_results` reads the responses for the metric
(`acc`: raw log-likelihoods; `acc_norm`: per character; `acc_bytes`: per byte). Positive: the
model answers right, and by how much; near zero: a small change of the weights flips the item.

Why: successive halving's `order: margin` (`evomerge.search.fidelity`) scores first the items the
best reference model is least sure of. Near the top of a search most items are answered right by
every good candidate; the ones that separate candidates are those a merge loses first, and the
expert's small margins point at them. Items of other output types have no margin (left out).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np


def answer_margin(task: Any, doc: Any, responses: Sequence[Any], metric: str) -> float | None:
    """One multiple-choice doc's margin from its responses ((log-likelihood, is_greedy) per
    choice, after filters); None for another output type or a gold outside the choices."""
    if getattr(task, "OUTPUT_TYPE", None) != "multiple_choice" or not responses:
        return None
    choices = list(task.doc_to_choice(doc))
    lls = np.array([float(response[0]) for response in responses])
    if len(lls) == 2 * len(choices):  # acc_mutual_info appends the unconditional log-likelihoods
        lls = lls[: len(choices)]
    if len(lls) != len(choices) or len(choices) < 2:
        return None
    name = metric.split(",", 1)[0]
    if name == "acc_norm":
        lls = lls / np.array([float(len(choice)) for choice in choices])
    elif name == "acc_bytes":
        lls = lls / np.array([float(len(choice.encode("utf-8"))) for choice in choices])
    gold = task.doc_to_text(doc) if getattr(task, "multiple_input", False) else task.doc_to_target(doc)
    golds = gold if isinstance(gold, list) else [gold]
    golds = [choices.index(g) if isinstance(g, str) and g in choices else g for g in golds]
    if not all(isinstance(g, (int, np.integer)) and 0 <= g < len(choices) for g in golds):
        return None
    right = np.zeros(len(choices), dtype=bool)
    right[list(golds)] = True
    if right.all():
        return None
    return float(lls[right].max() - lls[~right].max())


def task_margins(task: Any, metric: str) -> dict[int, float]:
    """Every scored doc's margin from the task's instances after a run (lm-eval leaves each
    instance's filtered responses on it); {} for a task that is not multiple choice."""
    filter_key = metric.split(",", 1)[1] if "," in metric else "none"
    by_doc: dict[int, list[Any]] = defaultdict(list)
    for instance in getattr(task, "_instances", None) or []:
        by_doc[int(instance.doc_id)].append(instance)
    margins = {}
    for doc_id, instances in by_doc.items():
        instances.sort(key=lambda instance: instance.idx)
        if any(filter_key not in instance.filtered_resps for instance in instances):
            return {}
        responses = [instance.filtered_resps[filter_key] for instance in instances]
        margin = answer_margin(task, instances[0].doc, responses, metric)
        if margin is None:
            return {}
        margins[doc_id] = margin
    return margins
