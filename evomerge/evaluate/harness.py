"""Score an in-memory `transformers` model with lm-evaluation-harness, many times in one process.

A merge search evaluates hundreds of candidates whose weights are written in place into one
model object.  `lm_eval.simple_evaluate` is the wrong tool for that: it re-indexes 14k built-in
tasks, reloads datasets and reseeds the global RNGs on every call.  `TaskEvaluator` does the
expensive parts once (task index, task and dataset loading, the `HFLM` wrapper) and then calls
`lm_eval.evaluator.evaluate` directly for each candidate.

Custom task YAMLs may give `dataset_kwargs.data_files` relative to their own folder (lm-eval
itself resolves them against the process's working directory); they are rewritten to absolute
paths when the task is loaded, so evaluation works from any working directory.
"""

from __future__ import annotations

import functools
import glob
import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evomerge.errors import first_line
from evomerge.evaluate.margins import task_margins
from evomerge.evaluate.protocol import ItemIds, ItemScores, Margins, Scores

if TYPE_CHECKING:
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from evomerge.config.space import SearchSpace

__all__ = ["TaskEvaluator", "build_task_evaluator", "evaluate_model_dir"]

_LM_EVAL_LOGGERS = ("lm_eval", "lm-eval")

# Warnings lm-eval emits on every evaluation of an in-memory model with `limit`; they are
# expected here and would drown a search's log.
_EXPECTED_WARNINGS = (
    "`pretrained` model kwarg is not of type `str`",
    "Passed an already-initialized model through `pretrained`",
    "--limit SHOULD ONLY BE USED FOR TESTING",
)


class _DropExpectedWarnings(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(expected in message for expected in _EXPECTED_WARNINGS)


_FILTER = _DropExpectedWarnings()

# Keys of lm-eval's per-task results that are labels, not numbers.
_NOT_METRICS = frozenset({"alias", "name"})


# Modules whose progress bars (one per task and per request batch, on every call) would flood a
# search's output; their module-level `tqdm` is swapped for a silent one while quiet.
_TQDM_MODULES = ("lm_eval.api.task", "lm_eval.api.model", "lm_eval.models.huggingface")


def _silent_tqdm(*args: Any, **kwargs: Any) -> Any:
    from tqdm import tqdm

    kwargs["disable"] = True
    return tqdm(*args, **kwargs)


@contextmanager
def _quiet_lm_eval(verbose: bool) -> Iterator[None]:
    """Hold lm-eval at WARNING, drop its expected warnings and progress bars, unless `verbose`."""
    if verbose:
        yield
        return
    import importlib
    import sys

    saved_levels = []
    for name in _LM_EVAL_LOGGERS:
        logger = logging.getLogger(name)
        saved_levels.append((logger, logger.level))
        if logger.getEffectiveLevel() < logging.WARNING:
            logger.setLevel(logging.WARNING)
    # A logger's filters see only records logged on that very logger, so filter where the
    # expected warnings are emitted.
    filtered = [logging.getLogger(name) for name in ("lm_eval.models.huggingface", "lm_eval.evaluator")]
    for logger in filtered:
        logger.addFilter(_FILTER)
    patched = []
    for module_name in _TQDM_MODULES:
        module = sys.modules.get(module_name) or importlib.import_module(module_name)
        if hasattr(module, "tqdm"):
            patched.append((module, module.tqdm))
            module.tqdm = _silent_tqdm
    datasets_bars = _datasets_progress_bars(False)
    try:
        yield
    finally:
        _datasets_progress_bars(datasets_bars)
        for module, original in patched:
            module.tqdm = original
        for logger in filtered:
            logger.removeFilter(_FILTER)
        for logger, level in saved_levels:
            logger.setLevel(level)


def _datasets_progress_bars(enable: bool) -> bool:
    """Switch `datasets`' progress bars (shown when a task's data is first read); returns the old state."""
    from datasets.utils import logging as datasets_logging

    was_enabled = datasets_logging.is_progress_bar_enabled()
    if enable:
        datasets_logging.enable_progress_bar()
    else:
        datasets_logging.disable_progress_bar()
    return was_enabled


# --------------------------------------------------------------------------------------------
# Relative data_files
# --------------------------------------------------------------------------------------------


def _yaml_folders(yaml_path: Path) -> list[Path]:
    """The YAML's folder, then the folders of the files it includes (recursively, in order)."""
    import yaml

    folders: list[Path] = []
    pending = [yaml_path.resolve()]
    seen: set[Path] = set()
    while pending:
        path = pending.pop(0)
        if path in seen or not path.is_file():
            continue
        seen.add(path)
        if path.parent not in folders:
            folders.append(path.parent)
        try:
            raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_include_only_loader())  # noqa: S506
        except yaml.YAMLError:
            continue
        includes = raw.get("include", []) if isinstance(raw, dict) else []
        for include in includes if isinstance(includes, list) else [includes]:
            include_path = Path(include)
            pending.append(include_path if include_path.is_absolute() else path.parent / include_path)
    return folders


@functools.cache
def _include_only_loader() -> type:
    """A YAML loader that ignores tags such as `!function` (only `include` is read with it)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    return Loader


# `datasets` builders that read local files: with these, a relative data_files path can only
# mean a local file.  With a Hub dataset it names a file inside the dataset's repository.
_LOCAL_BUILDERS = frozenset({"json", "csv", "parquet", "text", "arrow", "pandas", "xml"})


def _resolve_path(value: str, folders: Sequence[Path], *, local: bool) -> str:
    """`value` made absolute against the first of `folders` where it exists (globs allowed).

    If it exists in none, it is made absolute against the first folder when `local` (so the
    error names the path the YAML meant), else left alone (a path inside a Hub dataset).
    """
    if "://" in value or os.path.isabs(value) or not folders:
        return value
    for folder in folders:
        if glob.glob(str(folder / value)):
            return str((folder / value).resolve())
    return str((folders[0] / value).resolve()) if local else value


def _resolve_data_files(data_files: Any, folders: Sequence[Path], *, local: bool) -> Any:
    if isinstance(data_files, str):
        return _resolve_path(data_files, folders, local=local)
    if isinstance(data_files, list):
        return [_resolve_data_files(item, folders, local=local) for item in data_files]
    if isinstance(data_files, dict):
        return {split: _resolve_data_files(files, folders, local=local) for split, files in data_files.items()}
    return data_files


def _absolutise(cfg: dict[str, Any], yaml_path: Path | None) -> dict[str, Any]:
    """Rewrite the task config's relative local dataset paths against its YAML's folder."""
    if yaml_path is None:
        return cfg
    folders = _yaml_folders(Path(yaml_path))
    dataset_path = cfg.get("dataset_path")
    local = dataset_path in _LOCAL_BUILDERS
    kwargs = cfg.get("dataset_kwargs")
    if isinstance(kwargs, dict) and "data_files" in kwargs:
        data_files = _resolve_data_files(kwargs["data_files"], folders, local=local)
        cfg["dataset_kwargs"] = {**kwargs, "data_files": data_files}
    # `dataset_path: ./my_data` (a local folder or loading script next to the YAML).
    if isinstance(dataset_path, str) and dataset_path.startswith(("./", "../")):
        cfg["dataset_path"] = _resolve_path(dataset_path, folders, local=True)
    return cfg


@functools.lru_cache(maxsize=4)
def _task_manager_with_builtins(include_paths: tuple[Path, ...]) -> TaskManager:
    return _task_manager(include_paths, include_defaults=True)


def _task_manager(include_paths: Sequence[Path], include_defaults: bool) -> TaskManager:
    """A TaskManager whose task configs get their relative data paths made absolute."""
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._factory import TaskFactory

    class _ResolvingFactory(TaskFactory):
        def _load_full_config(self, entry: Any, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
            cfg = super()._load_full_config(entry, overrides)
            return _absolutise(cfg, getattr(entry, "yaml_path", None))

    manager = TaskManager(include_path=[str(p) for p in include_paths] or None, include_defaults=include_defaults)
    if not isinstance(getattr(manager, "_factory", None), TaskFactory):  # pragma: no cover - lm-eval API drift
        raise RuntimeError(
            "this lm-eval version builds tasks differently; evomerge needs lm-eval 0.4.10-0.4.x "
            "(pin the version in constraints.txt)"
        )
    manager._factory = _ResolvingFactory(meta=manager._factory._meta)
    return manager


# --------------------------------------------------------------------------------------------
# The evaluator
# --------------------------------------------------------------------------------------------


def _plain_float(value: Any) -> float:
    """lm-eval metric values as plain floats; 'N/A' and other non-numbers become NaN."""
    if isinstance(value, bool):
        return float(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


class TaskEvaluator:
    """Scores in-memory causal LMs on a fixed list of lm-eval tasks.

    Build it once; call `evaluate(model)` for each candidate.  Tasks, datasets and the task index
    are loaded in `__init__`; the `HFLM` wrapper is built on the first `evaluate` and rebuilt only
    when a different model object is passed, so weights changed in place are picked up at no
    cost.  No global RNG is reseeded and lm-eval's response cache is never used (it would return
    stale scores after an in-place change).
    """

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        include_paths: Sequence[Path] = (),
        tokenizer: Any,
        limit: int | float | None = None,
        num_fewshot: int | None = None,
        batch_size: int = 32,
        max_length: int | None = None,
        device: str = "cpu",
        apply_chat_template: bool = False,
        seed: int = 1234,
        model_args: Mapping[str, Any] | None = None,
        verbose: bool = False,
    ):
        if isinstance(tasks, str):
            tasks = [tasks]
        if not tasks:
            raise ValueError("no tasks to evaluate: pass at least one lm-eval task name")
        self.tasks = list(tasks)
        self.include_paths = [Path(p).resolve() for p in include_paths]
        for path in self.include_paths:
            if not path.is_dir():
                raise ValueError(f"include path {path} is not a directory of lm-eval task YAMLs")
        self.tokenizer = tokenizer
        self.limit = limit
        self.num_fewshot = num_fewshot
        self.batch_size = batch_size
        self.max_length = max_length
        self.device = device
        self.apply_chat_template = apply_chat_template
        self.seed = seed
        self.model_args = dict(model_args or {})
        self.verbose = verbose
        self._lm: HFLM | None = None
        self._lm_model: Any = None
        self._item_ids: ItemIds | None = None

        with _quiet_lm_eval(verbose):
            self._task_dict = self._load_tasks()

    def _load_tasks(self) -> dict[str, Any]:
        # Indexing only the include paths is cheap; adding lm-eval's ~15k built-in tasks is
        # not, so do that only when a requested name needs it (and only once
        # per process for the same include paths).
        manager = _task_manager(tuple(self.include_paths), include_defaults=False)
        if not all(name in manager.all_tasks for name in self.tasks):
            manager = _task_manager_with_builtins(tuple(self.include_paths))
        unknown = [name for name in self.tasks if name not in manager.all_tasks]
        if unknown:
            searched = ", ".join(str(p) for p in self.include_paths) or "no include paths"
            raise ValueError(f"unknown lm-eval task {unknown[0]!r} (searched: {searched} and lm-eval's built-in tasks)")
        task_dict = manager.load(self.tasks)
        for task in task_dict["tasks"].values():
            # What simple_evaluate would otherwise do on every call.
            if self.num_fewshot is not None:
                task.set_config(key="num_fewshot", value=self.num_fewshot)
            elif task.get_config("num_fewshot") is None:
                task.set_config(key="num_fewshot", value=0)
            task.set_fewshot_seed(seed=self.seed)
        return task_dict

    @property
    def task_names(self) -> list[str]:
        """The leaf tasks that will be scored (groups expanded)."""
        return list(self._task_dict["tasks"])

    def _wrap(self, model: Any) -> HFLM:
        if self._lm is None or self._lm_model is not model:
            from lm_eval.models.huggingface import HFLM

            if str(getattr(model, "device", self.device)) != str(self.device):
                model.to(self.device)
            self._lm = HFLM(
                pretrained=model,
                tokenizer=self.tokenizer,
                batch_size=self.batch_size,
                max_length=self.max_length,
                **self.model_args,
            )
            self._lm_model = model
        return self._lm

    def item_ids(self) -> ItemIds:
        """Every doc id each leaf task scores at full budget (the first `limit` documents)."""
        from lm_eval.evaluator_utils import get_sample_size

        if self._item_ids is None:
            ids = {}
            for name, task in self._task_dict["tasks"].items():
                total = len(task.eval_docs)
                size = get_sample_size(task, self.limit)
                ids[name] = list(range(total if size is None else min(size, total)))
            self._item_ids = ids
        return {name: list(ids) for name, ids in self._item_ids.items()}

    def evaluate(self, model: Any, items: ItemIds | None = None) -> Scores:
        """Score `model` (a `transformers` causal LM) on every task.

        Returns `{task_or_group: {"acc,none": 0.83, "acc_stderr,none": nan, ...}}` with every
        metric lm-eval reports, as plain floats (NaN where lm-eval gives no number).  The model
        is put in eval mode for the call and its training flag restored afterwards.  `items`
        limits a leaf task to those doc ids (tasks it does not name keep the full budget).
        """
        return self._run(model, items, log_samples=False)[0]

    def evaluate_items(self, model: Any, items: ItemIds | None = None) -> tuple[Scores, ItemScores]:
        """`evaluate`'s scores and, per leaf task and metric, each scored doc's value."""
        return self._run(model, items, log_samples=True)

    def evaluate_margins(self, model: Any, metrics: Mapping[str, str]) -> tuple[Scores, Margins]:
        """`evaluate`'s scores on every item and, per task named in `metrics` (task -> the metric
        that decides it), each doc's answer margin (`evomerge.evaluate.margins`); a task that is
        not multiple choice has none."""
        scores = self._run(model, None, log_samples=False)[0]
        margins = {}
        for name, metric in metrics.items():
            task = self._task_dict["tasks"].get(name)
            found = task_margins(task, metric) if task is not None else {}
            if found:
                margins[name] = found
        return scores, margins

    def _run(self, model: Any, items: ItemIds | None, *, log_samples: bool) -> tuple[Scores, ItemScores]:
        from lm_eval import evaluator

        samples = None
        if items is not None:
            unknown = sorted(set(items) - set(self.task_names))
            if unknown:
                raise ValueError(f"items name a task this evaluator does not score: {unknown[0]!r}")
            full = self.item_ids()
            # Sorted: lm-eval scores `samples` in dataset order but labels the i-th scored doc
            # with the i-th id as given, so an unsorted list would mislabel the per-item values.
            samples = {name: sorted(set(items.get(name, full[name]))) for name in self.task_names}
        was_training = bool(getattr(model, "training", False))
        with _quiet_lm_eval(self.verbose):
            lm = self._wrap(model)
            model.eval()
            try:
                output = evaluator.evaluate(
                    lm=lm,
                    task_dict=self._task_dict,
                    limit=None if samples is not None else self.limit,
                    samples=samples,
                    bootstrap_iters=0,
                    log_samples=log_samples,
                    apply_chat_template=self.apply_chat_template,
                )
            finally:
                if was_training:
                    model.train()
        if output is None:  # only non-zero ranks of a distributed run get None
            return {}, {}
        scores = {
            name: {metric: _plain_float(value) for metric, value in metrics.items() if metric not in _NOT_METRICS}
            for name, metrics in output["results"].items()
        }
        per_item: ItemScores = {}
        for name, logged in (output.get("samples") or {}).items() if log_samples else ():
            by_metric = per_item.setdefault(name, {})
            for example in logged:
                for metric in example["metrics"]:
                    key = f"{metric},{example['filter']}"
                    by_metric.setdefault(key, {})[int(example["doc_id"])] = _plain_float(example[metric])
        return scores, per_item


def build_task_evaluator(
    space: SearchSpace, tasks: list[str], *, limit: int | float | None, tokenizer: Any, device: str, verbose: bool
) -> TaskEvaluator:
    """The `lm_eval` evaluator kind: lm-eval tasks, with the space's `eval` settings.

    With `eval.request_cache` (the default) the requests are built and tokenised once per worker
    (evomerge.evaluate.request_cache), else lm-eval's `evaluate` runs whole for every candidate.
    """
    from evomerge.evaluate.request_cache import RequestCacheEvaluator

    evaluation = space.eval
    evaluator_class = RequestCacheEvaluator if evaluation.request_cache else TaskEvaluator
    return evaluator_class(
        tasks,
        include_paths=evaluation.include_paths,
        tokenizer=tokenizer,
        limit=limit,
        num_fewshot=evaluation.num_fewshot,
        batch_size=evaluation.batch_size,
        max_length=evaluation.max_length,
        device=device,
        apply_chat_template=evaluation.apply_chat_template,
        seed=evaluation.seed,
        model_args=evaluation.model_args,
        verbose=verbose,
    )


def evaluate_model_dir(
    path: Path,
    tasks: Sequence[str],
    *,
    include_paths: Sequence[Path] = (),
    device: str = "cpu",
    dtype: Any = "auto",
    **evaluator_kwargs: Any,
) -> dict[str, dict[str, float]]:
    """Load the checkpoint directory `path` (safetensors only, no remote code) and score it.

    `evaluator_kwargs` go to `TaskEvaluator` (limit, batch_size, num_fewshot, ...).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no model directory at {path}")
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, trust_remote_code=False, dtype=dtype)
    evaluator = TaskEvaluator(
        tasks, include_paths=include_paths, tokenizer=tokenizer, device=device, **evaluator_kwargs
    )
    return evaluator.evaluate(model)


# --------------------------------------------------------------------------------------------
# Checks before a search (evomerge.preflight): the tasks load, the metrics exist, requests fit
# --------------------------------------------------------------------------------------------


def load_task_dict(tasks: Sequence[str], include_paths: Sequence[Path] = ()) -> dict[str, Any]:
    """lm-eval's task dict for `tasks`, as TaskEvaluator loads it; ValueError naming an unknown task."""
    from evomerge.suggest import did_you_mean

    include = tuple(Path(p).resolve() for p in include_paths)
    manager = _task_manager(include, include_defaults=False)
    if not all(name in manager.all_tasks for name in tasks):
        manager = _task_manager_with_builtins(include)
    for name in tasks:
        if name not in manager.all_tasks:
            hint = did_you_mean(name, manager.all_tasks)
            searched = ", ".join(str(p) for p in include) or "no include paths"
            raise ValueError(f"unknown lm-eval task '{name}' (searched: {searched} and lm-eval's built-in tasks){hint}")
    try:
        with _quiet_lm_eval(False):
            return manager.load(list(dict.fromkeys(tasks)))
    except Exception as exc:  # noqa: BLE001 - lm-eval raises many kinds for a broken task YAML or dataset
        first = first_line(exc, 300)
        raise ValueError(f"lm-eval cannot load the tasks ({type(exc).__name__}: {first})") from None


def reported_metrics(task_dict: Mapping[str, Any], name: str) -> set[str]:
    """The `metric,filter` keys lm-eval will report for task or group `name`."""
    tasks = task_dict["tasks"]
    if name in tasks:
        task = tasks[name]
        filters = [f.name for f in getattr(task, "_filters", [])] or ["none"]
        return {f"{metric},{flt}" for metric in getattr(task, "_metric_fn_list", {}) for flt in filters}
    group = task_dict.get("groups", {}).get(name)
    if group is None:
        return set()
    leaves = [t.task_name for t in group.get_all_tasks()] if hasattr(group, "get_all_tasks") else []
    leaf_filters = {
        key.split(",", 1)[1] for leaf in leaves if leaf in tasks for key in reported_metrics(task_dict, leaf)
    }
    keys = set()
    for aggregate in group.aggregate_metric_list or ():
        for flt in aggregate.filter_list or sorted(leaf_filters):
            keys.add(f"{aggregate.metric},{flt}")
    return keys


def longest_continuation(task_dict: Mapping[str, Any], tokenizer: Any, *, limit: int | float | None) -> tuple[int, str]:
    """(tokens, task) of the longest scored continuation: lm-eval needs max_length >= it.

    Encoded as HFLM encodes a loglikelihood pair (trailing context spaces moved to the
    continuation; the continuation is what the whole string adds to the context).
    """
    from lm_eval.evaluator_utils import get_sample_size

    longest, where = 0, ""
    for name, task in task_dict["tasks"].items():
        if task.OUTPUT_TYPE not in ("loglikelihood", "multiple_choice"):
            continue
        with _quiet_lm_eval(False):
            task.build_all_requests(limit=get_sample_size(task, limit), rank=0, world_size=1)
        for instance in task.instances:
            context, continuation = instance.args[0], instance.args[1]
            spaces = len(context) - len(context.rstrip())
            if spaces:
                context, continuation = context[:-spaces], context[-spaces:] + continuation
            whole = tokenizer.encode(context + continuation, add_special_tokens=False)
            head = tokenizer.encode(context, add_special_tokens=False) if context else []
            if len(whole) - len(head) > longest:
                longest, where = len(whole) - len(head), name
    return longest, where
