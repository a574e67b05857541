"""`evomerge merge` never destroys or silently replaces what the user owns (issue 12, section 1).

Real files throughout: every folder the user had is compared byte for byte after the command,
and no staging, set-aside or empty folder may remain, after success or failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cli_in_process import exit_code as run
from families import random_family, write_yaml

from evomerge.io.output_dir import MARKER

REPO = Path(__file__).resolve().parents[1]
EVOMERGE = Path(sys.executable).with_name("evomerge")


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return random_family(tmp_path_factory.mktemp("safety"), finetunes=2)


def console(*argv) -> subprocess.CompletedProcess:
    """The real console script, on this checkout's code."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([str(EVOMERGE), *map(str, argv)], capture_output=True, text=True, env=env, timeout=120)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (names relative to it) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(folder: Path) -> list[str]:
    """Anything a run may leave behind by mistake: staging, set-aside and parts folders."""
    return [
        str(p)
        for p in folder.rglob("*")
        if "evomerge-staging" in p.name or "evomerge-old" in p.name or p.name == ".evomerge-parts"
    ]


def linear(tmp_path: Path, family, name="linear.yml", weight=0.5) -> Path:
    return write_yaml(
        tmp_path / name,
        f"merge_method: linear\nmodels:\n  - {{model: {family['ft1']}, parameters: {{weight: {weight}}}}}\n"
        f"  - {{model: {family['ft2']}, parameters: {{weight: 0.5}}}}\ndtype: float32\n",
    )


def overflowing(tmp_path: Path, family) -> Path:
    """A merge that fails after its tensors are computed (NaN/Inf): heavy work that must not start
    when the output is unusable, and that must leave an earlier output alone when it fails."""
    return write_yaml(
        tmp_path / "overflow.yml",
        f"merge_method: linear\nmodels:\n  - {{model: {family['ft1']}, parameters: {{weight: 1.0e+39}}}}\n"
        f"  - {{model: {family['ft2']}, parameters: {{weight: 1.0}}}}\nparameters: {{normalize: false}}\ndtype: float32\n",
    )


def test_overwrite_replaces_an_earlier_sharded_output_whole(tmp_path, family, capsys):
    config = linear(tmp_path, family)
    out = tmp_path / "out"
    assert run(["merge", config, out, "-q", "--out-shard-size", "20K"]) == 0
    sharded = snapshot(out)
    assert "model.safetensors.index.json" in sharded and len([n for n in sharded if n.endswith(".safetensors")]) > 2
    assert run(["merge", config, out, "-q"]) == 2  # never silently
    assert "--overwrite" in capsys.readouterr().err
    assert snapshot(out) == sharded
    assert run(["merge", config, out, "-q", "--overwrite"]) == 0
    names = {p.name for p in out.iterdir()}
    assert "model.safetensors" in names and not any(n.startswith("model-") for n in names)
    assert "model.safetensors.index.json" not in names  # the old shards and index went with the old output
    assert leftovers(tmp_path) == []
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 4


def test_a_folder_the_user_filled_is_never_written_into(tmp_path, family, capsys):
    config = linear(tmp_path, family)
    user = tmp_path / "mine"
    user.mkdir()
    (user / "README.md").write_text("my notes\n")
    (user / "config.json").write_text('{"mine": true}\n')
    before = snapshot(user)
    for extra in ([], ["--overwrite"]):
        assert run(["merge", config, user, "-q", *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and "did not write" in err
        assert snapshot(user) == before
    # an earlier evomerge output the user has added a file to: --overwrite keeps its hands off
    out = tmp_path / "out"
    assert run(["merge", config, out, "-q"]) == 0
    (out / "notes.txt").write_text("results of my evaluation\n")
    before = snapshot(out)
    assert run(["merge", config, out, "-q", "--overwrite"]) == 2
    assert "notes.txt" in capsys.readouterr().err
    assert snapshot(out) == before
    assert leftovers(tmp_path) == []


def test_a_failing_merge_leaves_the_old_output_and_no_new_folders(tmp_path, family, capsys):
    out = tmp_path / "out"
    assert run(["merge", linear(tmp_path, family), out, "-q"]) == 0
    before = snapshot(out)
    bad = overflowing(tmp_path, family)
    assert run(["merge", bad, out, "-q", "--overwrite"]) == 2
    assert "NaN or Inf" in capsys.readouterr().err
    assert snapshot(out) == before
    assert run(["merge", bad, tmp_path / "a" / "b" / "c", "-q"]) == 2
    assert not (tmp_path / "a").exists()  # the folders it made for the output are gone too
    assert leftovers(tmp_path) == []


def test_an_output_never_replaces_its_own_inputs(tmp_path, family, capsys):
    first = tmp_path / "first"
    assert run(["merge", linear(tmp_path, family), first, "-q"]) == 0
    before = snapshot(first)
    chained = write_yaml(
        tmp_path / "chained.yml",
        f"merge_method: linear\nmodels:\n  - {{model: {first}, parameters: {{weight: 0.5}}}}\n"
        f"  - {{model: {family['ft2']}, parameters: {{weight: 0.5}}}}\n",
    )
    assert run(["merge", chained, first, "-q", "--overwrite"]) == 2
    assert "is a source model" in capsys.readouterr().err
    # the folder holding the merge config itself
    inside = first / "recipe.yml"
    inside.write_text(linear(tmp_path, family).read_text())
    assert run(["merge", inside, first, "-q", "--overwrite"]) == 2
    assert "merge config" in capsys.readouterr().err
    inside.unlink()
    assert snapshot(first) == before
    assert leftovers(tmp_path) == []


def multi_document(tmp_path: Path, family, first_name: str = "part-a") -> Path:
    return write_yaml(
        tmp_path / "multi.yml",
        f"""name: {first_name}
merge_method: linear
models:
  - {{model: {family["ft1"]}, parameters: {{weight: 0.5}}}}
  - {{model: {family["ft2"]}, parameters: {{weight: 0.5}}}}
---
name: part-b
merge_method: task_arithmetic
base_model: {family["base"]}
models:
  - {{model: {family["ft2"]}, parameters: {{weight: 0.7}}}}
---
merge_method: linear
models:
  - {{model: {first_name}, parameters: {{weight: 0.5}}}}
  - {{model: part-b, parameters: {{weight: 0.5}}}}
""",
    )


@pytest.mark.parametrize("name", ["../../escaped", "{tmp}/absolute", "a/b", "..", ".hidden"])
def test_multi_document_names_are_identifiers_not_paths(tmp_path, family, capsys, name):
    work = tmp_path / "work"
    work.mkdir()
    victim = tmp_path / "absolute"  # an existing checkpoint where a path-like name would point
    assert run(["merge", linear(tmp_path, family), victim, "-q"]) == 0
    before = snapshot(tmp_path)
    config = multi_document(work, family, first_name=name.format(tmp=tmp_path))
    assert run(["merge", config, work / "out", "-q", "--overwrite"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "document 1: name" in err
    after = snapshot(tmp_path)
    after.pop("work/multi.yml")
    before_without_config = {k: v for k, v in before.items() if k != "work/multi.yml"}
    assert after == before_without_config  # nothing written anywhere, the victim untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["absolute", "linear.yml", "work"])


def test_intermediate_merges_stay_under_the_output_or_the_intermediate_dir(tmp_path, family, capsys, monkeypatch):
    config = multi_document(tmp_path, family)
    out = tmp_path / "out"
    assert run(["merge", config, out, "-q"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "multi.yml",
        "out",
    ]  # parts staged under the output, then gone
    assert not (out / ".evomerge-parts").exists()
    # the recipe the output carries is the whole multi-document file, its paths relative to the folder
    card = (out / "README.md").read_text()
    assert "mergekit-multi mergekit_config.yml" in card and "intermediate merge (document 1 of the recipe)" in card
    monkeypatch.chdir(out)
    assert run(["merge", "mergekit_config.yml", "../again", "-q"]) == 0
    monkeypatch.chdir(tmp_path)
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    shutil.rmtree(tmp_path / "again")
    parts = tmp_path / "parts"
    other = tmp_path / "out2"
    assert run(["merge", config, other, "-q", "--intermediate-dir", parts]) == 0
    assert sorted(p.name for p in parts.iterdir()) == ["part-a", "part-b"]
    assert all(
        (parts / n / MARKER).is_file() and (parts / n / "model.safetensors").is_file() for n in ("part-a", "part-b")
    )
    # the parts are outputs like any other: not replaced without --overwrite, checked before merging
    kept = snapshot(parts)
    assert run(["merge", config, tmp_path / "out3", "-q", "--intermediate-dir", parts]) == 2
    assert "part-a" in capsys.readouterr().err and not (tmp_path / "out3").exists()
    assert snapshot(parts) == kept
    assert run(["merge", config, out, "-q", "--intermediate-dir", out]) == 2  # the parts would vanish with the swap
    capsys.readouterr()
    assert run(["merge", config, other, "-q", "--overwrite", "--intermediate-dir", parts]) == 0
    assert leftovers(tmp_path) == []


def test_impossible_output_paths_are_one_line_errors_before_any_merging(tmp_path, family, capsys):
    bad = overflowing(tmp_path, family)  # merging it would fail with NaN: the path must be refused first
    a_file = tmp_path / "file.txt"
    a_file.write_text("not a folder\n")
    cases = {
        "under a file": a_file / "out",
        "no such place": "/proc/evomerge-test/out",
        "is a file": a_file,
        "name too long": tmp_path / ("x" * 300) / "out",
    }
    for index, (what, out) in enumerate(cases.items()):
        if index < 2:  # the real console script (each start imports torch: two are enough)
            result = console("merge", bad, out, "-q")
            code, err = result.returncode, result.stderr.strip()
        else:
            code, err = run(["merge", bad, out, "-q"]), capsys.readouterr().err.strip()
        assert code == 2, (what, err)
        assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, (what, err)
        assert "NaN" not in err, (what, err)
    assert a_file.read_text() == "not a folder\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt", "overflow.yml"]


def test_hub_cache_sources_are_named_by_their_hub_id(tmp_path, family):
    snapshot_dir = tmp_path / "hub" / "models--acme--tiny-llama" / "snapshots" / "0123abcd"
    shutil.copytree(family["ft1"], snapshot_dir)
    config = write_yaml(
        tmp_path / "hub.yml",
        f"merge_method: linear\nmodels:\n  - {{model: {snapshot_dir}, parameters: {{weight: 0.5}}}}\n"
        f"  - {{model: {family['ft2']}, parameters: {{weight: 0.5}}}}\n",
    )
    assert run(["merge", config, tmp_path / "out", "-q"]) == 0
    card = (tmp_path / "out" / "README.md").read_text()
    front_matter = card.split("---")[1]
    assert "base_model:\n- acme/tiny-llama\n" in front_matter and "base_model_relation: merge" in front_matter
    assert str(family["ft2"]) not in front_matter  # a local folder is not a Hub id
    assert "local folder" in card


def test_an_output_from_before_the_marker_is_still_recognised(tmp_path, family, capsys):
    config = linear(tmp_path, family)
    out = tmp_path / "out"
    assert run(["merge", config, out, "-q", "--out-shard-size", "20K"]) == 0
    (out / MARKER).unlink()  # as older evomerge versions wrote it: known by its card and file names
    assert run(["merge", config, out, "-q", "--overwrite"]) == 0
    assert not any(p.name.startswith("model-") for p in out.iterdir())
    (out / MARKER).unlink()
    (out / "mine.txt").write_text("mine\n")
    before = snapshot(out)
    assert run(["merge", config, out, "-q", "--overwrite"]) == 2
    assert "mine.txt" in capsys.readouterr().err and snapshot(out) == before


def test_a_swap_that_fails_halfway_puts_the_old_output_back(tmp_path, family, monkeypatch):
    from evomerge.errors import EvomergeError
    from evomerge.io import output_dir

    out = tmp_path / "out"
    assert run(["merge", linear(tmp_path, family), out, "-q"]) == 0
    before = snapshot(out)
    with pytest.raises(EvomergeError, match="does not match"):  # verification fails: nothing is moved
        with output_dir.staged_output(out, overwrite=True) as staged:
            (staged.staging / "model.safetensors").write_bytes(b"partial")
            staged.commit(verify=lambda folder: (_ for _ in ()).throw(EvomergeError("does not match")))
    assert snapshot(out) == before and leftovers(tmp_path) == []
    real_rename = os.rename
    calls = []

    def rename_fails_second_time(source, target):
        calls.append(target)
        if len(calls) == 2:  # the old output is aside, moving the new one in fails
            raise OSError(28, "No space left on device")
        real_rename(source, target)

    monkeypatch.setattr(output_dir.os, "rename", rename_fails_second_time)
    with pytest.raises(EvomergeError, match="could not move"):
        with output_dir.staged_output(out, overwrite=True) as staged:
            (staged.staging / "model.safetensors").write_bytes(b"new")
            staged.commit()
    monkeypatch.undo()
    assert snapshot(out) == before and leftovers(tmp_path) == []


def test_the_next_run_tidies_up_after_a_killed_one(tmp_path, family, capsys):
    """SIGKILL leaves a staging folder, or (between the two renames of the swap) the old output
    set aside: the next run on that output removes the first and puts the second back."""
    from evomerge.io import output_dir

    config = linear(tmp_path, family)
    out = tmp_path / "out"
    assert run(["merge", config, out, "-q"]) == 0
    before = snapshot(out)
    finished = subprocess.Popen(["true"])
    finished.wait()  # a process of this host that is gone, as a killed run's would be
    owner = f"{output_dir._owner().split('-')[0]}-{finished.pid}"
    staging = tmp_path / f".out.evomerge-staging-{owner}-0123abcd"
    staging.mkdir()
    (staging / ".model.safetensors.partial").write_bytes(b"half a tensor")
    out.rename(tmp_path / f".out.evomerge-old-{owner}-4567cdef")  # killed mid-swap: no out at all
    assert run(["merge", config, out, "-q"]) == 2  # the old output is back, so not replaced silently
    assert "--overwrite" in capsys.readouterr().err
    assert snapshot(out) == before and leftovers(tmp_path) == []
    live = tmp_path / f".out.evomerge-staging-{output_dir._owner().split('-')[0]}-1-89abcdef"
    live.mkdir()  # pid 1 is alive: another run's folder is never touched
    assert run(["merge", config, out, "-q", "--overwrite"]) == 0
    assert live.is_dir()
