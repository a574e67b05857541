"""lm-eval with a per-study request cache: requests built and tokenised once, per candidate only the model.

`lm_eval.evaluator.evaluate` rebuilds every request of every task (documents, templates, few-shot
contexts), tokenises and sorts it again on every call, though between two candidates of a merge
search only the weights change. `RequestCacheEvaluator` does that once, on the first model it
sees (lm-eval's own `build_all_requests` and HFLM's own tokenising), and per candidate runs only
the model over the cached token rows, then lm-eval's filters, `process_results` and aggregation,
so every metric still comes from lm-eval's code.

What matches lm-eval exactly: the tokens (HFLM's `loglikelihood` tokenises them, captured before it
would run the model), the left truncation to `max_length`, and the scoring (evaluate.loglikelihood_rows).
The choices of a question that share a context run as one packed row (checked on each new model
object against one row per choice; a model that fails the check is not packed). What can differ:
which rows share a batch, and packing, which move a log-probability by float rounding (~1e-7
relative). `generate_until` requests go to HFLM's own `generate_until` on every call (generation
dominates their cost anyway). A task with any other request type (`loglikelihood_rolling`) is
scored the plain lm-eval way, rebuilt on every call; that is logged once.

With `num_fewshot` > 0, lm-eval draws each call's few-shot examples from a random stream that it
never reseeds, so two plain calls see different prompts; the cache keeps the first draw for every
candidate (what a comparison between candidates wants).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from evomerge.evaluate.harness import _NOT_METRICS, TaskEvaluator, _plain_float, _quiet_lm_eval
from evomerge.evaluate.loglikelihood_rows import (
    Request,
    RowTable,
    call_options,
    forward_context,
    packing_supported,
    score_rows,
)
from evomerge.evaluate.protocol import ItemIds, ItemScores, Scores

__all__ = ["RequestCacheEvaluator"]

log = logging.getLogger("evomerge.evaluate")

# Request types the cache runs itself (loglikelihood) or hands to HFLM unchanged (generate_until).
_CACHED_TYPES = frozenset({"loglikelihood", "generate_until"})


@dataclass
class _CachedTask:
    """One leaf task's instances, built once, by (true) doc id."""

    task: Any
    budget: list[int] = field(default_factory=list)  # the full budget's doc ids (docs added later are not in it)
    by_doc: dict[int, list[Any]] = field(default_factory=dict)  # doc id -> instances in idx order
    scored: dict[int, list[Request]] = field(default_factory=dict)  # doc id -> its loglikelihood requests
    # doc_to_choice / doc_to_target / doc_to_text per doc, as lm-eval computed them (see _per_doc_memo)
    memo: dict[str, dict[int, tuple[Any, Any]]] = field(default_factory=dict)


class RequestCacheEvaluator(TaskEvaluator):
    """A TaskEvaluator that builds and tokenises lm-eval's requests once per evaluator.

    Same constructor, same `evaluate` / `evaluate_items` / `item_ids`, same scores (see the module
    docstring for the float-rounding caveat); per candidate it costs a batched forward pass plus
    lm-eval's per-document scoring.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._cached: dict[str, _CachedTask] | None = None
        self._plain_tasks: list[str] = []  # tasks scored the plain lm-eval way on every call
        self._table: RowTable | None = None  # the model input rows of every prepared request
        self._pack = True  # pack the choices that share a context (off when the model cannot)
        self._packing_checked: Any = None  # the model object packing was last checked on

    # ----------------------------------------------------------------------------------------
    # Once per evaluator
    # ----------------------------------------------------------------------------------------

    def _build_kwargs(self, lm: Any) -> dict[str, Any]:
        """The arguments lm_eval.evaluator.evaluate passes to build_all_requests (one process)."""
        chat = bool(self.apply_chat_template)
        return {
            "rank": 0,
            "world_size": 1,
            "apply_chat_template": chat,
            "chat_template": lm.apply_chat_template if chat else None,
            "tokenizer_name": getattr(lm, "tokenizer_name", "") if chat else "",
        }

    def _prepare(self, lm: Any) -> None:
        """Build every task's requests (the full budget) and tokenise them; says once which tasks cannot be cached."""
        from lm_eval.evaluator_utils import get_sample_size

        self._cached, self._plain_tasks = {}, []
        if self._pack and not packing_supported(lm.model):
            self._stop_packing()
        self._table = RowTable(lm.max_length, pack=self._pack)
        for name, task in self._task_dict["tasks"].items():
            task.build_all_requests(limit=get_sample_size(task, self.limit), **self._build_kwargs(lm))
            kinds = {instance.request_type for instance in task.instances}
            if lm.backend != "causal" or not kinds <= _CACHED_TYPES:
                self._plain_tasks.append(name)
                continue
            cached = _CachedTask(task)
            self._add(cached, task.instances, lm)
            cached.budget = sorted(cached.by_doc)
            self._cached[name] = cached
        if not self._packing_holds(lm):
            self._prepare(lm)
            return
        if self._plain_tasks:
            log.warning(
                "request cache: scoring %s the plain lm-eval way (request types or model it does not cache)",
                ", ".join(self._plain_tasks),
            )

    def _add(self, cached: _CachedTask, instances: list[Any], lm: Any) -> None:
        """Index `instances` by doc id and tokenise their loglikelihood requests as HFLM does."""
        assert self._table is not None
        for instance in instances:
            cached.by_doc.setdefault(instance.doc_id, []).append(instance)
        for doc_instances in cached.by_doc.values():
            doc_instances.sort(key=lambda instance: instance.idx)
        scored = [instance for instance in instances if instance.request_type == "loglikelihood"]
        by_doc: dict[int, list[tuple[Any, list[int], list[int]]]] = defaultdict(list)
        for instance, (context, continuation) in zip(scored, _tokenise(lm, scored), strict=True):
            if not context or not continuation or len(continuation) > lm.max_length:
                raise ValueError(
                    f"task '{instance.task_name}' doc {instance.doc_id}: a continuation of {len(continuation)} "
                    f"tokens after {len(context)} context tokens does not fit max_length {lm.max_length}"
                )
            by_doc[instance.doc_id].append((instance, context, continuation))
        for doc_id, tokenised in by_doc.items():
            cached.scored.setdefault(doc_id, []).extend(self._table.add(tokenised))

    def _needs_preparing(self, lm: Any) -> bool:
        """No requests yet, another max_length, or a new model object that cannot take packed rows."""
        if self._cached is None or self._table is None or lm.max_length != self._table.max_length:
            return True
        return not self._packing_holds(lm)

    def _packing_holds(self, lm: Any) -> bool:
        """Whether packing, if on, scores `lm`'s model right (checked once per model object); else turns it off."""
        if not self._pack or self._packing_checked is lm.model:
            return True
        if packing_supported(lm.model) and self._packing_agrees(lm):
            self._packing_checked = lm.model
            return True
        self._stop_packing()
        return False

    def _stop_packing(self) -> None:
        log.warning("request cache: this model does not score packed choices as it scores them one by one; not packing")
        self._pack = False

    def _packing_agrees(self, lm: Any) -> bool:
        """Whether a few packed rows score as their requests do one row each (else the model ignores the mask)."""
        assert self._cached is not None and self._table is not None
        requests = [
            request
            for cached in self._cached.values()
            for doc_requests in cached.scored.values()
            for request in doc_requests
            if self._table.rows[request.row].packed
        ][:16]
        if not requests:
            return True
        alone = RowTable(lm.max_length, pack=False)
        singles = [alone.add([(None, request.context, request.continuation)])[0] for request in requests]
        packed: dict[int, tuple[float, bool]] = {}
        try:
            options = call_options(lm.model)
            with forward_context(lm):
                for rows, readers in self._table.batches(requests, len(requests)):
                    scored = score_rows(lm, lm.model, self._table, rows, readers, options)
                    for row_readers, results in zip(readers, scored, strict=True):
                        packed.update(
                            (id(request), result) for request, result in zip(row_readers, results, strict=True)
                        )
                plain = [score_rows(lm, lm.model, alone, [single.row], [[single]], options)[0][0] for single in singles]
        except (TypeError, ValueError, RuntimeError):  # a model that refuses a 4D mask or position ids
            return False
        return all(
            abs(packed[id(request)][0] - logprob) <= 1e-4 * max(1.0, abs(logprob)) and packed[id(request)][1] == greedy
            for request, (logprob, greedy) in zip(requests, plain, strict=True)
        )

    def _add_docs(self, name: str, doc_ids: list[int], lm: Any) -> None:
        """Build and tokenise docs beyond the prepared budget (an `items` subset may name them)."""
        cached = self._cached[name]
        cached.task.build_all_requests(samples=doc_ids, **self._build_kwargs(lm))
        instances = cached.task.instances
        for instance in instances:  # with `samples`, lm-eval numbers the docs 0.. in dataset order
            instance.doc_id = doc_ids[instance.doc_id]
        self._add(cached, instances, lm)

    # ----------------------------------------------------------------------------------------
    # Per candidate
    # ----------------------------------------------------------------------------------------

    def _run(self, model: Any, items: ItemIds | None, *, log_samples: bool) -> tuple[Scores, ItemScores]:
        from lm_eval.evaluator_utils import _process_results

        selected = self._selection(items)
        was_training = bool(getattr(model, "training", False))
        with _quiet_lm_eval(self.verbose):
            lm = self._wrap(model)
            model.eval()
            try:
                if self._needs_preparing(lm):
                    self._prepare(lm)
                chosen = self._chosen_docs(selected, lm)
                self._run_loglikelihood(lm, model, chosen)
                self._run_generation(lm, chosen)
                self._run_plain(lm, selected, chosen)
            finally:
                if was_training:
                    model.train()
            accumulated, per_item = self._score(chosen, log_samples)
            output = _process_results(accumulated, self._task_dict.get("groups", {}), 0)._to_eval_results()
        scores = {
            name: {metric: _plain_float(value) for metric, value in metrics.items() if metric not in _NOT_METRICS}
            for name, metrics in output["results"].items()
        }
        return scores, per_item

    def _selection(self, items: ItemIds | None) -> dict[str, list[int] | None]:
        """Per leaf task: the sorted doc ids `items` names, or None for the full budget."""
        if items is None:
            return dict.fromkeys(self.task_names)
        unknown = sorted(set(items) - set(self.task_names))
        if unknown:
            raise ValueError(f"items name a task this evaluator does not score: {unknown[0]!r}")
        selection: dict[str, list[int] | None] = {}
        for name in self.task_names:
            if name not in items:
                selection[name] = None
                continue
            ids = sorted({int(doc_id) for doc_id in items[name]})
            total = len(self._task_dict["tasks"][name].eval_docs)
            if not ids or ids[0] < 0 or ids[-1] >= total:
                raise ValueError(f"items for task {name!r} must name doc ids in [0, {total}), got {items[name]!r}")
            selection[name] = ids
        return selection

    def _chosen_docs(self, selected: dict[str, list[int] | None], lm: Any) -> dict[str, tuple[list[int], dict]]:
        """Per task: (doc ids in lm-eval's order, doc id -> instances), with every response cleared."""
        assert self._cached is not None
        chosen: dict[str, tuple[list[int], dict]] = {}
        for name, ids in selected.items():
            cached = self._cached.get(name)
            if cached is None:
                continue
            if ids is None:
                ids = cached.budget
            else:
                missing = [doc_id for doc_id in ids if doc_id not in cached.by_doc]
                if missing:
                    self._add_docs(name, missing, lm)
            by_doc = {doc_id: cached.by_doc[doc_id] for doc_id in ids}
            for instances in by_doc.values():
                for instance in instances:
                    instance.resps = []
                    instance.filtered_resps = {}
            chosen[name] = (ids, by_doc)
        return chosen

    def _run_loglikelihood(self, lm: Any, model: Any, chosen: dict[str, tuple[list[int], dict]]) -> None:
        """Every chosen loglikelihood request's (logprob, is_greedy), from one batched pass over distinct rows."""
        assert self._cached is not None
        requests = [
            request
            for name, (ids, _) in chosen.items()
            for doc_id in ids
            for request in self._cached[name].scored.get(doc_id, ())
        ]
        if not requests:
            return
        assert self._table is not None
        batch_size = self.batch_size if isinstance(self.batch_size, int) else 32  # HFLM's "auto" is not copied
        options = call_options(model)
        with forward_context(lm):
            for rows, readers in self._table.batches(requests, batch_size):
                scored = score_rows(lm, model, self._table, rows, readers, options)
                for row_readers, results in zip(readers, scored, strict=True):
                    for request, result in zip(row_readers, results, strict=True):
                        request.instance.resps = [result] * (request.instance.repeats or 1)

    def _run_generation(self, lm: Any, chosen: dict[str, tuple[list[int], dict]]) -> None:
        """generate_until through HFLM itself, all tasks in one call as lm-eval sends them."""
        requests = [
            instance
            for _, by_doc in chosen.values()
            for instances in by_doc.values()
            for instance in instances
            if instance.request_type == "generate_until"
            for _ in range(instance.repeats or 1)
        ]
        if requests:
            for instance, text in zip(requests, lm.generate_until(requests, disable_tqdm=True), strict=True):
                instance.resps.append(text)

    def _run_plain(
        self, lm: Any, selected: dict[str, list[int] | None], chosen: dict[str, tuple[list[int], dict]]
    ) -> None:
        """The tasks the cache does not take: built and run as lm_eval.evaluator.evaluate would."""
        from lm_eval.evaluator_utils import get_sample_size

        by_type: dict[str, list[Any]] = defaultdict(list)
        for name in self._plain_tasks:
            task, ids = self._task_dict["tasks"][name], selected[name]
            limit = None if ids is not None else get_sample_size(task, self.limit)
            task.build_all_requests(limit=limit, samples=ids, **self._build_kwargs(lm))
            by_doc: dict[int, list[Any]] = defaultdict(list)
            for instance in task.instances:
                if ids is not None:  # lm-eval numbers the chosen docs 0.. in dataset order
                    instance.doc_id = ids[instance.doc_id]
                by_doc[instance.doc_id].append(instance)
                by_type[instance.request_type].extend([instance] * (instance.repeats or 1))
            for instances in by_doc.values():
                instances.sort(key=lambda instance: instance.idx)
            chosen[name] = (sorted(by_doc), dict(by_doc))
        for request_type, requests in by_type.items():
            for instance, response in zip(requests, getattr(lm, request_type)(requests), strict=True):
                instance.resps.append(response)

    def _score(self, chosen: dict[str, tuple[list[int], dict]], log_samples: bool) -> tuple[dict, ItemScores]:
        """lm-eval's filters and process_results per chosen doc, in lm-eval's order, ready for its aggregation."""
        accumulated: dict[str, dict[str, Any]] = {}
        per_item: ItemScores = {}
        for name in self.task_names:
            ids, by_doc = chosen[name]
            task = self._task_dict["tasks"][name]
            task._instances = [instance for doc_id in ids for instance in by_doc[doc_id]]
            cached = self._cached.get(name) if self._cached else None
            with _per_doc_memo(task, cached.memo if cached else None):
                raw_metrics = self._process(name, task, ids, by_doc, per_item if log_samples else None)
            accumulated[name] = {"task": task, "raw_metrics": raw_metrics, "logged_samples": []}
        return accumulated, per_item

    @staticmethod
    def _process(name: str, task: Any, ids: list[int], by_doc: dict, per_item: ItemScores | None) -> dict:
        """One task's filters and process_results, as lm_eval.evaluator.evaluate runs them."""
        task.apply_filters()
        raw_metrics: dict[tuple[str, str], list[Any]] = defaultdict(list)
        for filter_key in task._instances[0].filtered_resps:
            for doc_id in ids:
                instances = by_doc[doc_id]
                metrics = task.process_results(
                    instances[0].doc, [instance.filtered_resps[filter_key] for instance in instances]
                )
                for metric, value in metrics.items():
                    raw_metrics[(metric, filter_key)].append(value)
                    if per_item is not None:
                        by_metric = per_item.setdefault(name, {}).setdefault(f"{metric},{filter_key}", {})
                        by_metric[doc_id] = _plain_float(value)
        return raw_metrics


# Task methods process_results calls per doc that are pure functions of the doc: lm-eval renders
# a Jinja template afresh (compiling it) on every call, most of its scoring time on small models.
_PER_DOC = ("doc_to_choice", "doc_to_target", "doc_to_text")


@contextmanager
def _per_doc_memo(task: Any, memo: dict[str, dict[int, tuple[Any, Any]]] | None) -> Iterator[None]:
    """While scoring, answer `_PER_DOC` calls on a doc seen before from `memo` (lm-eval's own first answer).

    Keyed by the doc object's id; the memo keeps the doc alive, so an id is never reused. None:
    no memo (a task rebuilt on every call has new doc objects each time).
    """
    if memo is None:
        yield
        return
    for method_name in _PER_DOC:
        original, values = getattr(task, method_name), memo.setdefault(method_name, {})

        def memoised(doc: Any, *args: Any, _original: Any = original, _values: dict = values, **kwargs: Any) -> Any:
            if args or kwargs:
                return _original(doc, *args, **kwargs)
            held = _values.get(id(doc))
            if held is None:
                held = _values[id(doc)] = (doc, _original(doc))
            return held[1]

        setattr(task, method_name, memoised)
    try:
        yield
    finally:
        for method_name in _PER_DOC:
            delattr(task, method_name)


def _tokenise(lm: Any, instances: list[Any]) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) tokens of loglikelihood `instances`, from HFLM's own `loglikelihood`.

    HFLM tokenises a request and hands the tokens to `_loglikelihood_tokens`, which runs the
    model; that one step is swapped for a recorder, so the tokens are lm-eval's by construction.
    """
    recorded: list[tuple[list[int], list[int]]] = []

    def record(requests: list, disable_tqdm: bool = False, **_: Any) -> list[tuple[float, bool]]:
        recorded.extend((list(context), list(continuation)) for _, context, continuation in requests)
        return [(0.0, False)] * len(requests)

    lm._loglikelihood_tokens = record
    try:
        lm.loglikelihood(instances, disable_tqdm=True)
    finally:
        del lm._loglikelihood_tokens
    return recorded
