#!/usr/bin/env python
"""Try ~180 malformed inputs on the real `evomerge` console script and classify each answer.

A user's mistake should end in one `error:` line and exit status 2, before any heavy work. This
script builds a small random-weight family (with the demo tokenizer, so a search can run), writes
malformed inputs of every class a new user meets (command lines, numeric options, devices,
ports, output paths, merge YAML fields, space-file fields, model folders, storage URLs, an
existing study), runs each through the installed `evomerge` script in a subprocess and sorts the
answers:

  error        exit 2, one `error:` line (click's usage line above it allowed), no traceback
  bug line     exit 1, one line saying it is a bug (the traceback is hidden, not gone)
  traceback    a Python traceback reached the user
  accepted     exit 0: the input was taken as if it were fine
  warned       exit 0 with a warning naming the field, where mergekit accepts the value on purpose
  data lost    a file that must survive was changed or removed, or a read-only command created one
  other        anything else (another exit status, several error lines, a timeout)

It prints a table and writes results/malformed_inputs.md. Usage (from the repository root):

    python scripts/try_malformed_inputs.py            # all cases, 2 at a time
    python scripts/try_malformed_inputs.py --only storage --jobs 1 --keep
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
VERDICTS = ["error", "bug line", "traceback", "accepted", "warned", "data lost", "other"]


@dataclass(frozen=True)
class Case:
    kind: str  # the input class, e.g. "merge YAML"
    label: str  # what is wrong with the input
    argv: tuple[str, ...]  # after `evomerge`
    timeout: float = 60.0
    warn_ok: str | None = None  # mergekit accepts this on purpose: a warning naming this field is fine
    must_survive: tuple[str, ...] = ()  # files (relative to the work folder) that must stay byte for byte
    must_not_create: tuple[str, ...] = ()  # paths a read-only command must not create


@dataclass
class Outcome:
    case: Case
    verdict: str
    status: int | None
    seconds: float
    last_line: str


# ---------------------------------------------------------------------------------------------
# the inputs
# ---------------------------------------------------------------------------------------------
class Corpus:
    """Writes the family and the malformed files under `root`; each *_cases method returns cases."""

    def __init__(self, root: Path):
        self.root = root
        self.family = self._build_family()
        self.taken_port_socket = socket.socket()
        self.taken_port_socket.bind(("127.0.0.1", 0))
        self.taken_port_socket.listen()
        self.taken_port = self.taken_port_socket.getsockname()[1]
        self._counter = 0

    def _build_family(self) -> dict[str, Path]:
        from evomerge.demo import build_tokenizer
        from evomerge.synthetic import LlamaShape, make_random_family

        tokenizer = build_tokenizer()
        shape = LlamaShape(vocab=len(tokenizer), hidden=32, intermediate=64, layers=4, heads=4, kv_heads=2)
        family = make_random_family(self.root / "family", shape=shape, finetunes=2)
        for path in family.values():
            tokenizer.save_pretrained(path)
        return family

    def path(self, name: str) -> Path:
        return self.root / name

    def unique(self, stem: str) -> str:
        self._counter += 1
        return f"{stem}{self._counter:03d}"

    def write(self, name: str, text: str | bytes) -> str:
        target = self.root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(text, bytes):
            target.write_bytes(text)
        else:
            target.write_text(text)
        return str(target)

    # -- the valid starting points ------------------------------------------------------------
    def merge_config(self, **changes) -> dict:
        config = {
            "merge_method": "ties",
            "base_model": str(self.family["base"]),
            "models": [
                {"model": str(self.family["ft1"]), "parameters": {"weight": 0.6, "density": 0.5}},
                {"model": str(self.family["ft2"]), "parameters": {"weight": 0.4, "density": 0.5}},
            ],
            "dtype": "float32",
        }
        config.update(changes)
        return config

    def space(self, **changes) -> dict:
        space = {
            "models": [f"ft1@{self.family['ft1']}", f"ft2@{self.family['ft2']}"],
            "base_model": f"base@{self.family['base']}",
            "dtype": "float32",
            "device": "cpu",
            "genome": {
                "layer_granularity": 2,
                "methods": ["task_arithmetic", "ties"],
                "weight": [0.0, 1.0],
                "density": [0.3, 1.0],
                "lambda": [0.5, 2.0],
            },
            "objectives": [
                {"task": "demo_close", "metric": "acc,none", "selection_task": "demo_close_select", "name": "close"},
                {"task": "demo_sort", "metric": "acc,none", "selection_task": "demo_sort_select", "name": "sort"},
            ],
            "eval": {"include_paths": [str(REPO / "tasks")], "limit": 4, "selection_limit": 4, "batch_size": 16},
            "search": {
                "sampler": "random",
                "seed": 0,
                "n_trials": 2,
                "study_name": "s",
                "finalists": 1,
                "enqueue": [],
                "storage": f"sqlite:///{self.root / 'db' / self.unique('study')}.db",
            },
        }
        for dotted, value in changes.items():
            node = space
            *parents, last = dotted.split(".")
            for key in parents:
                node = node.setdefault(key, {})
            if value is _DELETE:
                node.pop(last, None)
            else:
                node[last] = value
        return space

    def yaml_file(self, folder: str, data: dict) -> str:
        return self.write(f"{folder}/{self.unique('f')}.yml", yaml.safe_dump(data, sort_keys=False))

    # -- model folders --------------------------------------------------------------------------
    def broken_model(self, name: str, damage) -> str:
        """A copy of ft1 with `damage(folder)` applied."""
        folder = self.root / "broken" / name
        shutil.copytree(self.family["ft1"], folder)
        damage(folder)
        return str(folder)

    # -- the controls (must succeed) -----------------------------------------------------------
    def controls(self) -> list[Case]:
        merge_yml = self.yaml_file("merge", self.merge_config())
        self.control_space = self.yaml_file(
            "space", self.space(**{"search.storage": f"sqlite:///{self.root / 'study.db'}"})
        )
        return [
            Case("control", "a valid merge YAML", ("validate", merge_yml)),
            Case("control", "a valid merge", ("merge", merge_yml, self.unique(str(self.root / "out/ok")), "-q")),
            Case("control", "a valid space file", ("validate", self.control_space)),
            Case(
                "control",
                "a valid search (makes the study the study cases use)",
                ("run", self.control_space, "-q"),
                timeout=300,
            ),
        ]

    # -- 1. command lines -------------------------------------------------------------------------
    def usage_cases(self) -> list[Case]:
        space, cfg, out = self.control_space, str(self.path("merge/any.yml")), str(self.path("out/usage"))
        argvs = {
            "run without its space file": ("run",),
            "front without a study": ("front",),
            "export without arguments": ("export",),
            "export without OUT_DIR": ("export", space),
            "dashboard without a study": ("dashboard",),
            "merge without arguments": ("merge",),
            "merge without OUT_DIR": ("merge", cfg),
            "validate without a file": ("validate",),
            "demo without a subcommand": ("demo", "nope"),
            "unknown option on run": ("run", space, "--trials", "3"),
            "unknown option on merge": ("merge", cfg, out, "--shard-size", "1M"),
            "unknown option on validate": ("validate", cfg, "--strict"),
            "unknown option on dashboard": ("dashboard", space, "--bind", "0.0.0.0"),
            "unknown root option": ("--verbose", "run", space),
            "misspelled command mrege": ("mrege", cfg, out),
            "misspelled command valdiate": ("valdiate", cfg),
            "misspelled command expotr": ("expotr", space, out),
            "misspelled command rn": ("rn", space),
            "--n-trials abc": ("run", space, "--n-trials", "abc"),
            "--timeout ten": ("run", space, "--timeout", "ten"),
            "--workers 1.5": ("run", space, "--workers", "1.5"),
            "--seed abc on run": ("run", space, "--seed", "abc"),
            "--top x": ("front", space, "--top", "x"),
            "--trial last": ("export", space, out, "--trial", "last"),
            "--port http": ("dashboard", space, "--port", "http"),
            "merge --workers two": ("merge", cfg, out, "--workers", "two"),
            "merge --seed 1e3": ("merge", cfg, out, "--seed", "1e3"),
            "--n-trials without its value": ("run", space, "--n-trials"),
            "--device without its value": ("merge", cfg, out, "--device"),
            "validate with two files": ("validate", cfg, cfg),
            "a flag given a value": ("merge", cfg, out, "--quiet=yes"),
        }
        return [Case("CLI usage", label, argv) for label, argv in argvs.items()]

    # -- 2. numeric options out of range ---------------------------------------------------------
    def range_cases(self) -> list[Case]:
        space, cfg = self.control_space, self.yaml_file("merge", self.merge_config())
        out = lambda: self.unique(str(self.path("out/range")))  # noqa: E731
        argvs = {
            "--n-trials 0": ("run", space, "--n-trials", "0"),
            "--n-trials -5": ("run", space, "--n-trials", "-5"),
            "--workers 0": ("run", space, "--workers", "0"),
            "--workers -1": ("run", space, "--workers", "-1"),
            "--timeout -1": ("run", space, "--timeout", "-1"),
            "--timeout 0": ("run", space, "--timeout", "0"),
            "--timeout nan": ("run", space, "--timeout", "nan"),
            "--timeout inf": ("run", space, "--timeout", "inf"),
            "run --seed -1": ("run", space, "--seed", "-1"),
            "run --seed 2**32": ("run", space, "--seed", str(2**32)),
            "front --top -1": ("front", space, "--top", "-1"),
            "export --trial -1": ("export", space, out(), "--trial", "-1"),
            "export --trial 10**20": ("export", space, out(), "--trial", str(10**20)),
            "dashboard --port 0": ("dashboard", space, "--port", "0"),
            "dashboard --port 70000": ("dashboard", space, "--port", "70000"),
            "dashboard --port -1": ("dashboard", space, "--port", "-1"),
            "merge --workers 0": ("merge", cfg, out(), "--workers", "0"),
            "merge --workers -2": ("merge", cfg, out(), "--workers", "-2"),
            "merge --seed -1": ("merge", cfg, out(), "--seed", "-1"),
            "merge --out-shard-size 0": ("merge", cfg, out(), "--out-shard-size", "0"),
            "merge --out-shard-size -5M": ("merge", cfg, out(), "--out-shard-size", "-5M"),
            "merge --out-shard-size 0.1": ("merge", cfg, out(), "--out-shard-size", "0.1"),
            "merge --out-shard-size 1Q": ("merge", cfg, out(), "--out-shard-size", "1Q"),
            "export --out-shard-size 0": ("export", space, out(), "--out-shard-size", "0"),
            "demo build --seed -1": ("demo", "build", out(), "--seed", "-1"),
        }
        return [Case("numeric options", label, argv) for label, argv in argvs.items()]

    # -- 3. devices -----------------------------------------------------------------------------
    def device_cases(self) -> list[Case]:
        space, cfg = self.control_space, self.yaml_file("merge", self.merge_config())
        out = lambda: self.unique(str(self.path("out/device")))  # noqa: E731
        cases = [
            Case("devices", f"merge --device {value!r}", ("merge", cfg, out(), "--device", value))
            for value in ["tpu", "cuda:99", "cuda:-1", "CPU", "", "meta", "cuda:0:1", "gpu"]
        ]
        cases += [
            Case("devices", "export --device tpu", ("export", space, out(), "--device", "tpu")),
            Case("devices", "export --device cuda:99", ("export", space, out(), "--device", "cuda:99")),
            Case("devices", "run --device npu", ("run", space, "--device", "npu")),
            Case("devices", "run --device cuda:99", ("run", space, "--device", "cuda:99", "-q"), timeout=120),
            Case("devices", "space file device: tpu", ("validate", self.yaml_file("space", self.space(device="tpu")))),
            Case(
                "devices",
                "space file device: cuda:99 (run)",
                ("run", self.yaml_file("space", self.space(device="cuda:99")), "-q"),
                timeout=120,
            ),
        ]
        return cases

    # -- 4. the dashboard's port and host ---------------------------------------------------------
    def port_cases(self) -> list[Case]:
        space, port = self.control_space, str(self.taken_port)
        return [
            Case("ports", "a taken port", ("dashboard", space, "--port", port)),
            Case("ports", "a taken port on 0.0.0.0", ("dashboard", space, "--host", "0.0.0.0", "--port", port)),
            Case("ports", "a host name that does not resolve", ("dashboard", space, "--host", "nohost.invalid")),
            Case("ports", "a host that is not this machine", ("dashboard", space, "--host", "203.0.113.7")),
            Case("ports", "a malformed host", ("dashboard", space, "--host", "300.1.1.1")),
            Case(
                "ports",
                "a taken port, a study name with --storage",
                ("dashboard", "nostudy", "--storage", f"sqlite:///{self.root / 'db' / 'nothing.db'}", "--port", port),
            ),
        ]

    # -- 5. output paths --------------------------------------------------------------------------
    def output_cases(self) -> list[Case]:
        space, cfg = self.control_space, self.yaml_file("merge", self.merge_config())
        a_file = self.write("outputs/a_file.txt", "user data\n")
        user_dir = self.root / "outputs/user_folder"
        user_dir.mkdir(parents=True)
        (user_dir / "README.md").write_text("my notes\n")
        (user_dir / "config.json").write_text('{"mine": true}\n')
        long_name = str(self.root / "outputs" / ("x" * 300))
        cases = [
            Case("output paths", "merge OUT_DIR under a file", ("merge", cfg, f"{a_file}/out")),
            Case(
                "output paths", "merge OUT_DIR is a file", ("merge", cfg, a_file), must_survive=("outputs/a_file.txt",)
            ),
            Case("output paths", "merge OUT_DIR name longer than 255 bytes", ("merge", cfg, long_name)),
            Case("output paths", "merge OUT_DIR in /proc", ("merge", cfg, "/proc/evomerge-out")),
            Case("output paths", "merge OUT_DIR in /sys", ("merge", cfg, "/sys/evomerge-out")),
            Case("output paths", "merge OUT_DIR is the config file", ("merge", cfg, cfg)),
            Case(
                "output paths",
                "merge into a folder with the user's README.md and config.json",
                ("merge", cfg, str(user_dir), "-q"),
                must_survive=("outputs/user_folder/README.md", "outputs/user_folder/config.json"),
            ),
            Case(
                "output paths",
                "merge --intermediate-dir under a file",
                ("merge", cfg, self.unique(str(self.path("out/o"))), "--intermediate-dir", f"{a_file}/parts"),
            ),
            Case("output paths", "front --plot is a folder", ("front", space, "--plot", str(self.root / "outputs"))),
            Case("output paths", "front --plot under a file", ("front", space, "--plot", f"{a_file}/front.png")),
            Case("output paths", "front --plot in /proc", ("front", space, "--plot", "/proc/front.png")),
            Case(
                "output paths",
                "front --plot with an unknown suffix",
                ("front", space, "--plot", str(self.root / "outputs/front.xyz")),
            ),
            Case("output paths", "export OUT_DIR under a file", ("export", space, f"{a_file}/out")),
            Case("output paths", "export OUT_DIR in /sys", ("export", space, "/sys/evomerge-export")),
            Case("output paths", "demo build under a file", ("demo", "build", f"{a_file}/demo")),
        ]
        return cases

    # -- 6. merge YAML fields ---------------------------------------------------------------------
    def merge_yaml_cases(self) -> list[Case]:
        ft1, ft2, base = (str(self.family[k]) for k in ("ft1", "ft2", "base"))

        def models(p1, p2=None):
            return [{"model": ft1, "parameters": p1}, {"model": ft2, "parameters": p2 if p2 is not None else p1}]

        variants: dict[str, tuple[dict, str | None]] = {
            "weight: abc": (self.merge_config(models=models({"weight": "abc", "density": 0.5})), None),
            "weight: .nan": (self.merge_config(models=models({"weight": float("nan"), "density": 0.5})), None),
            "weight: .inf": (self.merge_config(models=models({"weight": float("inf"), "density": 0.5})), None),
            "weight gradient holding a string": (
                self.merge_config(models=models({"weight": [0.1, "x", 0.5], "density": 0.5})),
                None,
            ),
            "weight gradient empty": (self.merge_config(models=models({"weight": [], "density": 0.5})), None),
            "weight: a mapping": (self.merge_config(models=models({"weight": {"a": 1}, "density": 0.5})), None),
            "weight: true": (self.merge_config(models=models({"weight": True, "density": 0.5})), None),
            "density: 1.5": (self.merge_config(models=models({"weight": 0.5, "density": 1.5})), "density"),
            "density: -0.1": (self.merge_config(models=models({"weight": 0.5, "density": -0.1})), "density"),
            "density: .nan": (self.merge_config(models=models({"weight": 0.5, "density": float("nan")})), None),
            "slerp t: -0.5": (
                self.merge_config(
                    merge_method="slerp",
                    base_model=ft1,
                    models=[{"model": ft1}, {"model": ft2}],
                    parameters={"t": -0.5},
                ),
                "t",
            ),
            "slerp t: 1.5": (
                self.merge_config(
                    merge_method="slerp", base_model=ft1, models=[{"model": ft1}, {"model": ft2}], parameters={"t": 1.5}
                ),
                "t",
            ),
            "slerp t gradient with .nan": (
                self.merge_config(
                    merge_method="slerp",
                    base_model=ft1,
                    models=[{"model": ft1}, {"model": ft2}],
                    parameters={"t": [0, float("nan"), 1]},
                ),
                None,
            ),
            "task_arithmetic lambda: abc": (
                self.merge_config(merge_method="task_arithmetic", parameters={"lambda": "abc"}),
                None,
            ),
            "breadcrumbs gamma: -1": (self.merge_config(merge_method="breadcrumbs", parameters={"gamma": -1.0}), None),
            "misspelled parameter wieght": (self.merge_config(models=models({"wieght": 0.5, "density": 0.5})), None),
            "unknown merge_method": (self.merge_config(merge_method="super_merge"), None),
            "merge_method: null": (self.merge_config(merge_method=None), None),
            "merge_method: a list": (self.merge_config(merge_method=["ties"]), None),
            "models: a string": (self.merge_config(models="ft1, ft2"), None),
            "models: empty": (self.merge_config(models=[]), None),
            "model entry without model:": (self.merge_config(models=[{"parameters": {"weight": 1}}]), None),
            "model path that does not exist": (
                self.merge_config(models=[{"model": "/no/such/model", "parameters": {"weight": 1, "density": 1}}]),
                None,
            ),
            "model path is a file": (
                self.merge_config(
                    models=[
                        {"model": str(self.family["ft1"] / "config.json"), "parameters": {"weight": 1, "density": 1}}
                    ]
                ),
                None,
            ),
            "ties without base_model": (self.merge_config(base_model=None), None),
            "base_model does not exist": (self.merge_config(base_model="/no/such/base"), None),
            "dtype: float33": (self.merge_config(dtype="float33"), None),
            "out_dtype: int8": (self.merge_config(out_dtype="int8"), None),
            "tokenizer_source: a missing model": (self.merge_config(tokenizer_source="/no/such/tokenizer"), None),
            "slices layer_range past the last layer": (self._slices([0, 99]), None),
            "slices layer_range reversed": (self._slices([3, 1]), None),
            "slices layer_range of strings": (self._slices(["a", "b"]), None),
            "slices of different lengths": (
                {
                    "merge_method": "linear",
                    "dtype": "float32",
                    "slices": [
                        {
                            "sources": [
                                {"model": ft1, "layer_range": [0, 4], "parameters": {"weight": 1}},
                                {"model": ft2, "layer_range": [0, 2], "parameters": {"weight": 1}},
                            ]
                        }
                    ],
                },
                None,
            ),
            "a filter list without value": (
                self.merge_config(models=models({"weight": [{"filter": "mlp"}], "density": 0.5})),
                None,
            ),
            "a filter that matches no tensor": (
                self.merge_config(
                    models=models(
                        {"weight": [{"filter": "no_such_proj", "value": 0.2}, {"value": 0.5}], "density": 0.5}
                    )
                ),
                "matches no tensor",
            ),
        }
        cases = []
        for label, (data, warn) in variants.items():
            cases.append(Case("merge YAML", label, ("validate", self.yaml_file("merge", data)), warn_ok=warn))
        raw = {
            "weight: 1e400 (overflows to inf)": self._raw_ties("1e400"),
            "a top-level list": "- merge_method: linear\n",
            "duplicate keys": f"merge_method: linear\nmerge_method: ties\nbase_model: {base}\nmodels:\n  - {{model: {ft1}, parameters: {{weight: 1, density: 0.5}}}}\n",
            "duplicate parameter keys": self._raw_ties("0.5, weight: 0.9"),
            "an empty file": "",
            "a YAML syntax error": "merge_method: [linear\nmodels: -\n",
            "tab indentation": "merge_method: linear\nmodels:\n\t- model: x\n",
        }
        for label, text in raw.items():
            cases.append(Case("merge YAML", label, ("validate", self.write(f"merge/{self.unique('raw')}.yml", text))))
        binary = {
            "a binary file (safetensors) as config": (self.family["ft1"] / "model.safetensors").read_bytes()[:4096],
            "latin-1 bytes in a model path": f"merge_method: linear\nmodels:\n  - model: {ft1}\xe9\n".encode("latin-1"),
            "a NUL byte in a model path": f'merge_method: linear\nmodels:\n  - model: "{ft1}\\0x"\n    parameters: {{weight: 1}}\n'.encode(),
        }
        for label, data in binary.items():
            cases.append(Case("merge YAML", label, ("validate", self.write(f"merge/{self.unique('bin')}.yml", data))))
        cases += [
            Case("merge YAML", "the config is a folder", ("validate", str(self.root / "merge"))),
            Case("merge YAML", "the config is /dev/null", ("validate", "/dev/null")),
            Case(
                "merge YAML",
                "the config does not exist",
                ("merge", str(self.root / "merge/missing.yml"), str(self.root / "out/m")),
            ),
        ]
        # what `merge` itself does with values validate may accept
        for label, data in {
            "merge with weight: .nan": self.merge_config(models=models({"weight": float("nan"), "density": 0.5})),
            "merge with a weight gradient holding a string": self.merge_config(
                models=models({"weight": [0.1, "x"], "density": 0.5})
            ),
            "merge with density: 1.5": self.merge_config(models=models({"weight": 0.5, "density": 1.5})),
        }.items():
            cases.append(
                Case(
                    "merge YAML",
                    label,
                    ("merge", self.yaml_file("merge", data), self.unique(str(self.path("out/y"))), "-q"),
                    warn_ok="density" if "density" in label else None,
                )
            )
        cases += self._multi_document_cases()
        return cases

    def _slices(self, layer_range) -> dict:
        return {
            "merge_method": "linear",
            "dtype": "float32",
            "slices": [
                {
                    "sources": [
                        {"model": str(self.family["ft1"]), "layer_range": layer_range, "parameters": {"weight": 1}},
                        {"model": str(self.family["ft2"]), "layer_range": layer_range, "parameters": {"weight": 1}},
                    ]
                }
            ],
        }

    def _raw_ties(self, weight: str) -> str:
        return (
            f"merge_method: ties\nbase_model: {self.family['base']}\ndtype: float32\nmodels:\n"
            f"  - {{model: {self.family['ft1']}, parameters: {{density: 0.5, weight: {weight}}}}}\n"
            f"  - {{model: {self.family['ft2']}, parameters: {{density: 0.5, weight: 0.5}}}}\n"
        )

    def _multi_document_cases(self) -> list[Case]:
        """Named documents of a mergekit-multi file: names must stay inside the output folder."""
        ft1, ft2 = str(self.family["ft1"]), str(self.family["ft2"])

        def doc(name, a=ft1, b=ft2):
            head = f"name: {name}\n" if name else ""
            return (
                f"{head}merge_method: linear\ndtype: float32\nmodels:\n  - {{model: {a}, parameters: {{weight: 0.5}}}}\n"
                f"  - {{model: {b}, parameters: {{weight: 0.5}}}}\n"
            )

        cases = []
        for label in [
            "a document named ../../VICTIM",
            "a document with an absolute name",
            "two documents with one name",
            "the last document named",
            "a document name with a slash",
        ]:
            out = Path(self.unique(str(self.path("out/multi"))))
            victim = out.parent / self.unique("victim")  # ../../victim from OUT/.evomerge-parts
            self.write(str((victim / "model.safetensors").relative_to(self.root)), b"the user's earlier checkpoint")
            texts = {
                "a document named ../../VICTIM": doc(f"../../{victim.name}")
                + "---\n"
                + doc(None, f"../../{victim.name}", ft2),
                "a document with an absolute name": doc(str(victim)) + "---\n" + doc(None, str(victim), ft2),
                "two documents with one name": doc("part") + "---\n" + doc("part") + "---\n" + doc(None, "part", ft2),
                "the last document named": doc("part") + "---\n" + doc("final", "part", ft2),
                "a document name with a slash": doc("a/b") + "---\n" + doc(None, "a/b", ft2),
            }
            config = self.write(f"merge/{self.unique('multi')}.yml", texts[label])
            cases.append(
                Case(
                    "merge YAML",
                    label,
                    ("merge", config, str(out), "-q"),
                    must_survive=(str((victim / "model.safetensors").relative_to(self.root)),),
                )
            )
        return cases

    # -- 7. space-file fields ---------------------------------------------------------------------
    def space_cases(self) -> list[Case]:
        changes: dict[str, dict] = {
            "gene range holding a string": {"genome.weight": ["abc", 1.0]},
            "gene range with .nan": {"genome.weight": [float("nan"), 1.0]},
            "gene range with an infinite bound": {"genome.weight": [0.0, float("inf")]},
            "gene range reversed": {"genome.weight": [1.0, 0.0]},
            "density range outside [0, 1]": {"genome.density": [-0.5, 1.5]},
            "layer_granularity: 3 (does not divide the 4 layers)": {"genome.layer_granularity": 3},
            "layer_granularity: 3 (does not divide 4 layers)": {"genome.layer_granularity": 3},
            "layer_granularity: two": {"genome.layer_granularity": "two"},
            "methods: an unknown one": {"genome.methods": ["super_merge"]},
            "methods: empty": {"genome.methods": []},
            "a genome filter that matches no tensor": {"genome.filters": {"no_such_proj": {"weight": [0.0, 1.0]}}},
            "objectives: empty": {"objectives": []},
            "an unknown lm-eval task": {"objectives": [{"task": "no_such_task", "metric": "acc,none"}]},
            "an unknown metric": {"objectives": [{"task": "demo_close", "metric": "bleu,none"}]},
            "direction: up": {"objectives": [{"task": "demo_close", "metric": "acc,none", "direction": "up"}]},
            "objective weight: abc": {"objectives": [{"task": "demo_close", "metric": "acc,none", "weight": "abc"}]},
            "an unknown selection_task": {
                "objectives": [{"task": "demo_close", "metric": "acc,none", "selection_task": "no_such"}]
            },
            "eval.limit: -1": {"eval.limit": -1},
            "eval.limit: 0": {"eval.limit": 0},
            "eval.num_fewshot: -1": {"eval.num_fewshot": -1},
            "eval.batch_size: 0": {"eval.batch_size": 0},
            "eval.max_length: -5": {"eval.max_length": -5},
            "eval.include_paths: a missing folder": {"eval.include_paths": ["/no/such/tasks"]},
            "search.sampler: genetic": {"search.sampler": "genetic"},
            "sampler_options the sampler does not take": {"search.sampler_options": {"population": 10}},
            "search.n_trials: -5": {"search.n_trials": -5},
            "search.timeout: -1": {"search.timeout": -1},
            "search.workers: 0": {"search.workers": 0},
            "search.seed: -1": {"search.seed": -1},
            "search.finalists: -1": {"search.finalists": -1},
            "models: empty": {"models": []},
            "a model path that does not exist": {"models": ["x@/no/such/model", f"ft2@{self.family['ft2']}"]},
            "a model without name@": {"models": [str(self.family["ft1"]), "noat"]},
            "allow_pickle: true with a safetensors base": {"allow_pickle": True},
            "ray.num_cpus_per_worker: -1": {"ray.num_cpus_per_worker": -1},
            "a misspelled section objectivs": {"objectivs": [{"task": "demo_close", "metric": "acc,none"}]},
            "an unknown top-level key": {"surprise": 1},
            "dtype: float33": {"dtype": "float33"},
        }
        cases = [
            Case("space file", label, ("validate", self.yaml_file("space", self.space(**c))))
            for label, c in changes.items()
        ]
        duplicate = yaml.safe_dump(self.space(), sort_keys=False).replace(
            "dtype: float32\n", "dtype: float32\ndtype: bfloat16\n", 1
        )
        cases.append(Case("space file", "duplicate keys", ("validate", self.write("space/dup.yml", duplicate))))
        # what `run` does with values validate may accept (cheap when refused up front)
        for label, c in {
            "run with eval.max_length: 1 (breaks scoring)": {"eval.max_length": 1},
            "run with sampler_options the sampler does not take": {"search.sampler_options": {"population": 10}},
            "run with an unknown metric": {"objectives": [{"task": "demo_close", "metric": "bleu,none"}]},
        }.items():
            cases.append(
                Case("space file", label, ("run", self.yaml_file("space", self.space(**c)), "-q"), timeout=180)
            )
        return cases

    # -- 8. model folders -------------------------------------------------------------------------
    def model_folder_cases(self) -> list[Case]:
        import torch
        from safetensors.torch import load_file, save_file

        def truncate(folder):
            f = folder / "model.safetensors"
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])

        def bad_header(folder):
            f = folder / "model.safetensors"
            data = f.read_bytes()
            f.write_bytes((10**12).to_bytes(8, "little") + data[8:])

        def garbage_header(folder):
            f = folder / "model.safetensors"
            data = bytearray(f.read_bytes())
            data[8:40] = b"{not json at all!!!!!!!!!!!!!!!!"
            f.write_bytes(bytes(data))

        def empty_weights(folder):
            (folder / "model.safetensors").write_bytes(b"")

        def poison(value):
            def apply(folder):
                tensors = load_file(folder / "model.safetensors")
                tensors["model.layers.1.mlp.up_proj.weight"][0, 0] = value
                save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})

            return apply

        def drop_tensor(folder):
            tensors = load_file(folder / "model.safetensors")
            del tensors["model.layers.2.self_attn.q_proj.weight"]
            save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})

        def wrong_shape(folder):
            tensors = load_file(folder / "model.safetensors")
            tensors["model.layers.0.mlp.up_proj.weight"] = torch.zeros(65, 32)
            save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})

        def int_tensor(folder):
            tensors = load_file(folder / "model.safetensors")
            tensors["model.norm.weight"] = torch.ones(32, dtype=torch.int64)
            save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})

        def edit_config(**changes):
            def apply(folder):
                config = json.loads((folder / "config.json").read_text())
                config.update(changes)
                (folder / "config.json").write_text(json.dumps(config))

            return apply

        def no_config(folder):
            (folder / "config.json").unlink()

        def garbage_config(folder):
            (folder / "config.json").write_text("{ this is not json")

        def binary_config(folder):
            (folder / "config.json").write_bytes(bytes(range(256)) * 4)

        def no_weights(folder):
            (folder / "model.safetensors").unlink()

        def pickle_only(folder):
            torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
            (folder / "model.safetensors").unlink()

        def blocked_pickle(folder):
            import pickle

            (folder / "model.safetensors").unlink()
            (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"x": Path("/etc")}))

        def missing_shard(folder):
            (folder / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {}, "weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}})
            )

        def garbage_index(folder):
            (folder / "model.safetensors.index.json").write_text("[not an index")

        damages = {
            "truncated safetensors": truncate,
            "a header length past the end of the file": bad_header,
            "a safetensors header that is not JSON": garbage_header,
            "an empty safetensors file": empty_weights,
            "NaN in a source tensor": poison(float("nan")),
            "Inf in a source tensor": poison(float("inf")),
            "a tensor missing": drop_tensor,
            "a tensor of another shape": wrong_shape,
            "an integer tensor": int_tensor,
            "hidden_size differs in config.json": edit_config(hidden_size=48),
            "another architecture in config.json": edit_config(
                architectures=["MistralForCausalLM"], model_type="mistral"
            ),
            "num_hidden_layers: 8 in config.json": edit_config(num_hidden_layers=8),
            "config.json missing": no_config,
            "config.json not JSON": garbage_config,
            "config.json binary": binary_config,
            "no weights at all": no_weights,
            "only pytorch_model.bin (pickle)": pickle_only,
            "an index naming a missing shard": missing_shard,
            "an index that is not JSON": garbage_index,
        }
        cases = []
        ft2 = str(self.family["ft2"])
        for index, (label, damage) in enumerate(damages.items()):
            folder = self.broken_model(f"m{index:02d}", damage)
            config = self.yaml_file(
                "merge",
                {
                    "merge_method": "linear",
                    "dtype": "float32",
                    "models": [
                        {"model": folder, "parameters": {"weight": 0.5}},
                        {"model": ft2, "parameters": {"weight": 0.5}},
                    ],
                },
            )
            cases.append(Case("model folders", f"validate: {label}", ("validate", config)))
            if "config.json" not in label:  # merge reads the same config the same way
                cases.append(
                    Case(
                        "model folders",
                        f"merge: {label}",
                        ("merge", config, self.unique(str(self.path("out/model"))), "-q"),
                    )
                )
        blocked = self.broken_model("blocked", blocked_pickle)
        config = self.yaml_file(
            "merge",
            {
                "merge_method": "linear",
                "dtype": "float32",
                "models": [
                    {"model": blocked, "parameters": {"weight": 0.5}},
                    {"model": ft2, "parameters": {"weight": 0.5}},
                ],
            },
        )
        cases.append(
            Case(
                "model folders",
                "merge --allow-pickle: a blocked pickle",
                ("merge", config, self.unique(str(self.path("out/model"))), "--allow-pickle", "-q"),
            )
        )
        for label, name in [("space file: a truncated model", "m00"), ("space file: NaN in a model", "m04")]:
            space = self.space(models=[f"bad@{self.root / 'broken' / name}", f"ft2@{ft2}"])
            cases.append(Case("model folders", label, ("validate", self.yaml_file("space", space))))
        return cases

    # -- 9. storage URLs --------------------------------------------------------------------------
    def storage_cases(self) -> list[Case]:
        garbage = self.write("db/garbage.db", os.urandom(4096))
        (self.root / "db/a_folder.db").mkdir(parents=True)
        urls = {
            "not a URL": "not a url",
            "an empty URL": "",
            "an unknown dialect": "foodb://localhost/x",
            "sqlite in a folder that does not exist": "sqlite:////no/such/folder/x.db",
            "sqlite on a garbage file": f"sqlite:///{garbage}",
            "sqlite on a folder": f"sqlite:///{self.root / 'db/a_folder.db'}",
            "postgresql on a closed port": "postgresql+psycopg://user@127.0.0.1:1/db",
            "postgresql on a host that does not resolve": "postgresql+psycopg://user@nohost.invalid/db",
            "mysql without its driver": "mysql+pymysql://user@127.0.0.1:1/db",
        }
        cases = []
        for label, url in urls.items():
            cases.append(Case("storage URLs", f"front --storage: {label}", ("front", "s", "--storage", url)))
            cases.append(
                Case(
                    "storage URLs",
                    f"space file storage: {label}",
                    ("validate", self.yaml_file("space", self.space(**{"search.storage": url}))),
                )
            )
            if label in (
                "not a URL",
                "sqlite on a garbage file",
                "postgresql on a closed port",
                "sqlite in a folder that does not exist",
            ):
                cases.append(
                    Case(
                        "storage URLs",
                        f"export --storage: {label}",
                        ("export", "s", self.unique(str(self.path("out/st"))), "--storage", url),
                    )
                )
            if label in ("not a URL", "postgresql on a closed port"):
                cases.append(
                    Case(
                        "storage URLs",
                        f"run --storage: {label}",
                        ("run", self.control_space, "--storage", url, "-q"),
                        timeout=120,
                    )
                )
        missing = self.root / "db" / "never_created.db"
        cases.append(
            Case(
                "storage URLs",
                "front on a database that does not exist (must not create it)",
                ("front", "s", "--storage", f"sqlite:///{missing}"),
                must_not_create=(str(missing.relative_to(self.root)),),
            )
        )
        missing2 = self.root / "db" / "never_created_2.db"
        cases.append(
            Case(
                "storage URLs",
                "export from a database that does not exist (must not create it)",
                ("export", "s", self.unique(str(self.path("out/st"))), "--storage", f"sqlite:///{missing2}"),
                must_not_create=(str(missing2.relative_to(self.root)),),
            )
        )
        return cases

    # -- 10. an existing study ----------------------------------------------------------------------
    def study_cases(self) -> list[Case]:
        """Against the study the control search made (cases that need it run after the controls)."""
        space, storage = self.control_space, f"sqlite:///{self.root / 'study.db'}"
        edited = yaml.safe_load(Path(space).read_text())
        edited["genome"]["methods"] = ["linear"]
        edited["genome"]["layer_granularity"] = 4
        edited_path = self.write("space/edited.yml", yaml.safe_dump(edited, sort_keys=False))
        victim_dir = self.root / "victim_study"
        victim_dir.mkdir()
        shutil.copy(space, victim_dir / "space.yml")
        victim = yaml.safe_load(Path(space).read_text())
        victim["search"]["storage"] = f"sqlite:///{victim_dir / 'study.db'}"
        (victim_dir / "space.yml").write_text(yaml.safe_dump(victim, sort_keys=False))
        out = lambda: self.unique(str(self.path("out/study")))  # noqa: E731
        return [
            Case("existing study", "export --trial 999 (no such trial)", ("export", space, out(), "--trial", "999")),
            Case("existing study", "front of a study name that is not there", ("front", "nope", "--storage", storage)),
            Case(
                "existing study",
                "export of a study name that is not there",
                ("export", "nope", out(), "--storage", storage),
            ),
            Case("existing study", "front with a space file edited under the study", ("front", edited_path)),
            Case(
                "existing study",
                "run with a space file edited under the study",
                ("run", edited_path, "-q", "--n-trials", "3"),
                timeout=180,
            ),
            Case(
                "existing study",
                "export --overwrite into the folder holding the space file and the database",
                ("export", str(victim_dir / "space.yml"), str(victim_dir), "--overwrite", "-q"),
                must_survive=("victim_study/space.yml", "victim_study/study.db"),
                timeout=120,
            ),
            Case(
                "existing study",
                "dashboard of a study on a taken port",
                ("dashboard", space, "--port", str(self.taken_port)),
            ),
        ]

    def prepare_victim_study(self) -> None:
        shutil.copy(self.root / "study.db", self.root / "victim_study" / "study.db")


_DELETE = object()
CLASSES = ["usage", "range", "device", "port", "output", "merge_yaml", "space", "model_folder", "storage", "study"]


# ---------------------------------------------------------------------------------------------
# running and classifying
# ---------------------------------------------------------------------------------------------
def console_script() -> list[str]:
    script = Path(sys.executable).with_name("evomerge")
    if script.exists():
        return [str(script)]
    found = shutil.which("evomerge")
    if found is None:
        sys.exit("the evomerge console script is not installed (pip install -e .)")
    return [found]


def _digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def run_case(case: Case, root: Path, command: list[str], env: dict[str, str]) -> Outcome:
    before = {name: _digest(root / name) for name in case.must_survive}
    started = time.perf_counter()
    try:
        completed = subprocess.run(
            [*command, *case.argv],
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=case.timeout,
            stdin=subprocess.DEVNULL,
        )
        status, stdout, stderr = completed.returncode, completed.stdout, completed.stderr
    except subprocess.TimeoutExpired as exc:
        status, stdout, stderr = None, _text(exc.stdout), _text(exc.stderr)
    seconds = time.perf_counter() - started
    lost = [name for name, digest in before.items() if digest is not None and _digest(root / name) != digest]
    created = [name for name in case.must_not_create if (root / name).exists()]
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    last_line = lines[-1] if lines else (stdout.strip().splitlines() or [""])[-1]
    errors = [line for line in lines if line.startswith("error:")]
    if lost or created:
        verdict = "data lost"
        last_line = f"{'changed or removed: ' + ', '.join(lost) if lost else ''}{'created: ' + ', '.join(created) if created else ''} | {last_line}"
    elif "Traceback (most recent call last)" in stderr + stdout:
        verdict = "traceback"
        last_line = next((line for line in reversed(lines) if not line.startswith(" ")), last_line)
    elif status == 2 and len(errors) == 1 and lines[-1] == errors[0]:
        verdict = "error"
    elif status == 1 and len(errors) == 1 and "internal error" in errors[0]:
        verdict = "bug line"
    elif status == 0:
        warned = case.warn_ok and any("warning" in line.lower() and case.warn_ok in line for line in lines)
        verdict = "warned" if warned else "accepted"
    else:
        verdict = "other"
        if status is None:
            last_line = f"timed out after {case.timeout:.0f}s | {last_line}"
        else:
            last_line = f"exit {status} | {last_line}"
    return Outcome(case, verdict, status, seconds, last_line[:400])


def _text(data) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data


def child_env(root: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in ("EVOMERGE_DEBUG", "RAY_ADDRESS")}
    env.update(
        PYTHONPATH=str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_DATASETS_CACHE=str(root / "hf_datasets_cache"),
        COLUMNS="120",
        NO_COLOR="1",
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
    )
    return env


# ---------------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------------
def _shorten(text: str, root: Path) -> str:
    return text.replace(str(root), "$W").replace("|", "\\|")


def _command_line(case: Case, root: Path) -> str:
    shown = " ".join(arg if arg and " " not in arg else repr(arg) for arg in case.argv)
    shown = _shorten(shown, root)
    return "evomerge " + (shown if len(shown) < 140 else shown[:137] + "...")


def counts_table(outcomes: list[Outcome]) -> list[str]:
    kinds = list(dict.fromkeys(o.case.kind for o in outcomes))
    header = f"| class | cases | {' | '.join(VERDICTS)} |"
    rows = [header, "|" + "---|" * (len(VERDICTS) + 2)]
    for kind in [*kinds, None]:
        chosen = [o for o in outcomes if kind is None or o.case.kind == kind]
        tally = Counter(o.verdict for o in chosen)
        name = "**all**" if kind is None else kind
        rows.append(f"| {name} | {len(chosen)} | " + " | ".join(str(tally.get(v, 0)) for v in VERDICTS) + " |")
    return rows


def machine_line() -> str:
    import torch

    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    branch = subprocess.run(
        ["git", "-C", str(REPO), "branch", "--show-current"], capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
    ).stdout.strip()
    return (
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores, "
        f"Python {platform.python_version()}, torch {torch.__version__}, "
        f"CUDA {'available' if torch.cuda.is_available() else 'not available'}; "
        f"evomerge at {commit} ({branch}{', with uncommitted changes' if dirty else ''})"
    )


def write_report(
    path: Path, outcomes: list[Outcome], controls: list[Outcome], root: Path, argv: list[str], seconds: float
) -> None:
    failing = [o for o in outcomes if o.verdict != "error"]
    tally = Counter(o.verdict for o in outcomes)
    lines = [
        "# Malformed inputs on the `evomerge` console script",
        "",
        f"Command: `python scripts/{Path(__file__).name}{' ' + ' '.join(argv) if argv else ''}` "
        f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {seconds / 60:.1f} min)",
        "",
        f"Machine: {machine_line()}.",
        "",
        "Each input is run through the installed `evomerge` script in a subprocess, on a small random-weight",
        "Llama family (base + 2 fine-tunes, 4 layers, the demo tokenizer) written by the script. Verdicts:",
        "`error` = exit 2 with one `error:` line and no traceback (the expected answer); `bug line` = exit 1",
        "with one line saying it is a bug (a hidden traceback); `traceback`; `accepted` = exit 0 as if the",
        "input were fine; `warned` = exit 0 with a warning naming the field (where mergekit accepts the value",
        "on purpose); `data lost` = a file that must survive changed, or a read-only command created one;",
        "`other` = another exit status, several error lines, or a timeout.",
        "",
        f"**{len(outcomes)} malformed inputs: {tally.get('error', 0)} one-line errors, {tally.get('traceback', 0)} tracebacks, "
        f"{tally.get('bug line', 0)} bug lines, {tally.get('accepted', 0)} accepted, {tally.get('warned', 0)} warned, "
        f"{tally.get('data lost', 0)} data lost, {tally.get('other', 0)} other.**",
        "",
        *counts_table(outcomes),
        "",
        "## Controls (valid inputs; each must succeed for the cases above to mean anything)",
        "",
        "| control | exit | seconds | last line |",
        "|---|---|---|---|",
        *[f"| {o.case.label} | {o.status} | {o.seconds:.1f} | {_shorten(o.last_line, root)} |" for o in controls],
        "",
        f"## Every case that is not a one-line error ({len(failing)})",
        "",
        "`$W` is the script's work folder.",
        "",
        "| class | input | verdict | command | last line |",
        "|---|---|---|---|---|",
        *[
            f"| {o.case.kind} | {o.case.label} | {o.verdict} | `{_command_line(o.case, root)}` | {_shorten(o.last_line, root)} |"
            for o in failing
        ],
        "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


def main() -> None:
    global REPO
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=2, help="cases run at once (default 2)")
    parser.add_argument("--only", choices=CLASSES, action="append", help="only these classes (repeatable)")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "malformed_inputs.md", help="the report")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (its path is printed)")
    parser.add_argument("--tree", type=Path, help="measure the evomerge code of another checkout (default: this one)")
    args = parser.parse_args()
    if args.tree is not None:
        REPO = args.tree.resolve()
        sys.path.insert(0, str(REPO))

    started = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="evomerge-malformed-"))
    command = console_script()
    env = child_env(root)
    try:
        print(f"building the family and the inputs in {root} ...", flush=True)
        corpus = Corpus(root)
        control_cases = corpus.controls()
        controls = [run_case(case, root, command, env) for case in control_cases]
        for outcome in controls:
            print(
                f"control: {outcome.case.label}: exit {outcome.status} ({outcome.seconds:.1f}s) {outcome.last_line[:100]}",
                flush=True,
            )
        cases: list[Case] = []
        for name in args.only or CLASSES:
            cases += getattr(corpus, f"{name}_cases")()
        if (root / "study.db").exists() and (root / "victim_study").exists():
            corpus.prepare_victim_study()
        print(f"{len(cases)} malformed inputs, {args.jobs} at a time ...", flush=True)
        outcomes: list[Outcome] = []
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            futures = [pool.submit(run_case, case, root, command, env) for case in cases]
            for index, future in enumerate(as_completed(futures), 1):
                outcome = future.result()
                outcomes.append(outcome)
                marker = "" if outcome.verdict == "error" else "  <--"
                print(
                    f"[{index:3d}/{len(cases)}] {outcome.verdict:9} {outcome.case.kind:15} {outcome.case.label[:60]:60} "
                    f"{outcome.seconds:5.1f}s{marker}",
                    flush=True,
                )
        corpus.taken_port_socket.close()
        outcomes.sort(key=lambda o: cases.index(o.case))
        seconds = time.perf_counter() - started
        print()
        print("\n".join(counts_table(outcomes)))
        write_report(args.out, outcomes, controls, root, sys.argv[1:], seconds)
        print(f"\nwrote {args.out} ({seconds / 60:.1f} min)")
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
