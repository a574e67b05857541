"""`evomerge align`: read two checkpoints, match B's units to A's, write the permuted B.

The output is B's checkpoint with its hidden units reordered (same function, same config and
tokenizer, tensors in B's dtype), ready to be a merge input beside A. It is written through
`staged_output`: a failed run leaves nothing, and an earlier output is replaced only with
`overwrite`. Matching holds A's and B's permuted tensors as float32 on its device (8 bytes per
parameter of one model); the output is then written tensor by tensor from B's files.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from evomerge.align.matching import permute_tensor, weight_matching
from evomerge.align.spec import PermutationSpec, permutation_spec
from evomerge.devices import resolve_device
from evomerge.errors import CompatibilityError, EvomergeError
from evomerge.io.checkpoint import copy_tokenizer
from evomerge.io.model_dir import ModelDir
from evomerge.io.output_dir import check_free_space, staged_output
from evomerge.io.safetensors_io import StreamingCheckpointWriter
from evomerge.progress import progress_bar

ALIGNMENT_FILE = "evomerge_alignment.json"  # what was aligned to what, and how far the descent went


@dataclass(frozen=True)
class AlignReport:
    out_dir: Path
    architecture: str
    permutations: int
    sweeps: int
    converged: bool
    objective_before: float
    objective_after: float
    seconds: float


def _spec(model: ModelDir) -> PermutationSpec:
    shapes = {name: tuple(info.shape) for name, info in model.tensors.items()}
    return permutation_spec(model.architecture, model.config, shapes, where=str(model.path))


def check_pair(model_a: ModelDir, model_b: ModelDir) -> PermutationSpec:
    """The permutation structure the two models share; refuses an architecture without one, and a
    pair that differ in architecture, tensor names, shapes or head layout (one line each)."""
    spec = _spec(model_a)
    if model_a.architecture != model_b.architecture:
        raise CompatibilityError(
            f"{model_b.path}: architecture {model_b.architecture} differs from {model_a.path}'s "
            f"{model_a.architecture}; align needs two models of one architecture"
        )
    different = sorted(set(model_a.tensors) ^ set(model_b.tensors))
    if different:
        holder, other = (model_a, model_b) if different[0] in model_a.tensors else (model_b, model_a)
        raise CompatibilityError(
            f"{other.path}: has no tensor {different[0]} (which {holder.path} has); align needs two models of one shape"
        )
    for name, info in model_a.tensors.items():
        theirs = tuple(model_b.tensors[name].shape)
        if tuple(info.shape) != theirs:
            raise CompatibilityError(
                f"{model_b.path}: tensor {name} has shape {theirs}, {model_a.path} has {tuple(info.shape)}; "
                "align needs two models of one shape"
            )
    spec_b = _spec(model_b)
    if (spec_b.head_dim, spec_b.group) != (spec.head_dim, spec.group):
        raise CompatibilityError(
            f"{model_b.path}: config.json: heads of {spec_b.head_dim} dims, {spec_b.group} per key/value head; "
            f"{model_a.path} has {spec.head_dim} and {spec.group}: the two models split attention differently"
        )
    return spec


def _read_float(model: ModelDir, spec: PermutationSpec, device: str) -> dict[str, torch.Tensor]:
    return {name: model.get(name).to(device).float() for name in model.tensors if spec.perms_of(name)}


def align_models(
    path_a: Path,
    path_b: Path,
    out_dir: Path,
    *,
    seed: int = 0,
    max_iterations: int = 100,
    overwrite: bool = False,
    allow_pickle: bool = False,
    device: str = "cpu",
    progress: bool = True,
) -> AlignReport:
    """Write B permuted to match A into `out_dir` (see the module docstring). The matching runs on
    `device` (cpu, cuda, cuda:N, auto); the output is written from B's files on the CPU."""
    started = time.perf_counter()
    if max_iterations < 1:
        raise EvomergeError(f"--max-iterations: expected at least 1 sweep, got {max_iterations}")
    device = resolve_device(device)
    model_a, model_b = ModelDir(path_a, allow_pickle=allow_pickle), ModelDir(path_b, allow_pickle=allow_pickle)
    try:
        spec = check_pair(model_a, model_b)
        protected = {"a source model": [Path(path_a), Path(path_b)]}
        with staged_output(out_dir, overwrite=overwrite, protected=protected) as staged:
            check_free_space(staged.staging, model_b.total_bytes)
            a, b = _read_float(model_a, spec, device), _read_float(model_b, spec, device)
            steps = len(spec.sizes)
            with progress_bar(steps, "matching, sweep 1", enabled=progress, unit="permutations") as bar:

                def on_step(sweep: int, step: int) -> None:
                    bar.update(completed=step, description=f"matching, sweep {sweep}")

                result = weight_matching(spec, a, b, seed=seed, max_iterations=max_iterations, on_step=on_step)
            del a, b
            _write_permuted(model_b, spec, result.perms, staged.staging, progress=progress)
            shutil.copyfile(model_b.path / "config.json", staged.staging / "config.json")
            copy_tokenizer(model_b.path, staged.staging)
            record = {
                "aligned": str(Path(path_b).resolve()),
                "to": str(Path(path_a).resolve()),
                "method": "git re-basin weight matching",
                "seed": seed,
                "sweeps": result.sweeps,
                "converged": result.converged,
                "objective_before": result.objective_before,
                "objective_after": result.objective_after,
                "permutations": {name: perm.tolist() for name, perm in sorted(result.perms.items())},
            }
            (staged.staging / ALIGNMENT_FILE).write_text(json.dumps(record) + "\n")  # one line: long permutations
            staged.commit(verify=lambda directory: _verify(model_b, directory))
    finally:
        model_a.close()
        model_b.close()
    return AlignReport(
        Path(out_dir),
        spec.architecture,
        len(spec.sizes),
        result.sweeps,
        result.converged,
        result.objective_before,
        result.objective_after,
        time.perf_counter() - started,
    )


def _write_permuted(model_b: ModelDir, spec: PermutationSpec, perms, out_dir: Path, *, progress: bool) -> None:
    """B's tensors, each permuted in its own dtype (a reordering: exact), in B's order."""
    layout = [(name, info.shape, info.dtype) for name, info in model_b.tensors.items()]
    with (
        progress_bar(len(layout), "writing", enabled=progress, unit="tensors") as bar,
        StreamingCheckpointWriter(out_dir, layout) as writer,
    ):
        for name, _, _ in layout:
            writer.write(name, permute_tensor(spec, name, model_b.get(name), perms).contiguous())
            bar.advance()


def _verify(model_b: ModelDir, directory: Path) -> None:
    written = ModelDir(directory)
    try:
        found = {name: (tuple(info.shape), info.dtype) for name, info in written.tensors.items()}
    finally:
        written.close()
    expected = {name: (tuple(info.shape), info.dtype) for name, info in model_b.tensors.items()}
    if found != expected:
        raise EvomergeError(f"{directory}: the written checkpoint does not match {model_b.path}; nothing was replaced")
