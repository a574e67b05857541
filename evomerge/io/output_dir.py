"""Where a checkpoint is written, so that nothing the user owns is lost or silently replaced.

Every writer of a checkpoint (one-shot merge, multi-document parts, export) goes through
`staged_output`: the target is checked up front (before any model is read), the checkpoint is
written into a staging folder beside it (same filesystem), verified there, and only then swapped
in: the old output is renamed aside, the new one renamed into place, the old one deleted. Any
failure removes the staging folder and the folders it created, and keeps the old output; after
a run that was killed outright, the next run on the same output tidies up (`recover_killed_run`).

A folder is replaced only when evomerge wrote it: `MARKER` lists the files it wrote. Anything
else in the folder (the user's notes, a space file, a study database) makes it a refusal, with
or without `--overwrite`; nothing is ever deleted that evomerge did not write.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import socket
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from evomerge.errors import EvomergeError
from evomerge.io.checkpoint import TOKENIZER_FILES

MARKER = ".evomerge-output.json"
# Outputs from before the marker existed: recognised by their card and by holding only these names.
_LEGACY_CARD_LINE = "Made with [evomerge]"
_LEGACY_NAMES = {"config.json", "README.md", "mergekit_config.yml", "model.safetensors.index.json"}


def _listing(paths: Iterable[str], limit: int = 4) -> str:
    names = sorted(paths)
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def written_files(directory: Path) -> set[str] | None:
    """The names evomerge wrote into `directory` (its marker, or a legacy card), else None."""
    marker = directory / MARKER
    if marker.is_file():
        try:
            files = json.loads(marker.read_text()).get("files")
        except (OSError, ValueError, AttributeError):
            return None
        return {str(name) for name in files} if isinstance(files, list) else None
    card = directory / "README.md"
    try:
        legacy = card.is_file() and _LEGACY_CARD_LINE in card.read_text(errors="replace")[:4096]
    except OSError:
        return None
    if not legacy:
        return None
    names = {p.name for p in directory.iterdir()}
    ours = {
        n
        for n in names
        if n in _LEGACY_NAMES or n in TOKENIZER_FILES or (n.startswith("model") and n.endswith(".safetensors"))
    }
    has_weights = any(n.endswith(".safetensors") for n in ours)
    return ours if has_weights and "mergekit_config.yml" in ours else None


def _contains(folder: Path, path: Path) -> bool:
    """`path` is `folder` or lies somewhere under it (both resolved)."""
    return path == folder or folder in path.parents


def _resolved(path: Path) -> Path:
    try:
        return Path(os.path.realpath(path))
    except (OSError, ValueError) as exc:
        raise EvomergeError(f"{path}: not a usable path ({exc})") from None


def refuse_protected(target: Path, protected: Mapping[str, Iterable[Path]]) -> None:
    """Refuse an output folder that is, or contains, one of `protected` (description -> paths)."""
    real = _resolved(Path(target))
    for what, paths in protected.items():
        for path in paths:
            inner = _resolved(Path(path))
            if _contains(real, inner):
                raise EvomergeError(
                    f"{target}: {'is' if real == inner else 'contains'} {what} ({path}); "
                    "evomerge never writes over it, even with --overwrite: choose another output directory"
                )


def check_target(target: Path, *, overwrite: bool, protected: Mapping[str, Iterable[Path]] | None = None) -> str:
    """Check an output folder before any work; returns 'new', 'empty' or 'replace'.

    `protected` maps a description ("the space file") to paths the output must never hold: a
    target equal to or containing one is refused even with --overwrite."""
    target = Path(target)
    if "\x00" in str(target):
        raise EvomergeError(f"{target!r}: not a usable path (it contains a NUL byte)")
    refuse_protected(target, protected or {})
    try:
        return _classify(target, overwrite)
    except OSError as exc:  # a name too long, a loop of symlinks, an unreadable folder ...
        raise EvomergeError(f"{target}: not a usable output directory ({exc.strerror or exc})") from None


def _classify(target: Path, overwrite: bool) -> str:
    for parent in [target, *target.parents]:
        if parent.exists() or parent.is_symlink():
            anchor = parent
            break
    else:  # pragma: no cover - '.' always exists
        anchor = Path(".")
    if not anchor.is_dir():
        where = "exists and is not a directory" if anchor == target else f"{anchor} is a file, not a directory"
        raise EvomergeError(f"{target}: {where}; choose another output directory")
    writable_dir = anchor if anchor != target else (target.parent if str(target.parent) else Path("."))
    if not os.access(writable_dir, os.W_OK | os.X_OK):
        raise EvomergeError(
            f"{target}: cannot write to {writable_dir} (permission denied); choose another output directory"
        )
    if anchor != target:
        return "new"
    present = {p.name for p in target.iterdir()}
    if not present:
        return "empty"
    ours = written_files(target)
    if ours is None:
        has_weights = any(n.endswith((".safetensors", ".bin")) for n in present)
        kind = "a checkpoint evomerge did not write" if has_weights else "files evomerge did not write"
        raise EvomergeError(
            f"{target}: holds {kind} ({_listing(present)}); evomerge replaces only its own outputs: "
            "choose a new or empty directory"
        )
    foreign = present - ours - {MARKER}
    if foreign:
        raise EvomergeError(
            f"{target}: holds files evomerge did not write ({_listing(foreign)}) beside an earlier output; "
            "--overwrite never deletes them: move them away or choose another directory"
        )
    if not overwrite:
        raise EvomergeError(
            f"{target}: already holds a checkpoint evomerge wrote; pass --overwrite to replace it, or choose another directory"
        )
    return "replace"


@dataclass
class StagedOutput:
    """A staging folder beside `target`; `commit` swaps it in, `discard` removes every trace."""

    target: Path
    staging: Path
    overwrite: bool
    protected: Mapping[str, Iterable[Path]]
    created: list[Path] = field(default_factory=list)  # parent folders this run made, outermost first

    def commit(self, verify: Callable[[Path], None] | None = None) -> Path:
        """Verify the staging folder, mark it as evomerge's, then move it into place."""
        if verify is not None:
            verify(self.staging)
        files = sorted(p.name for p in self.staging.iterdir())
        (self.staging / MARKER).write_text(json.dumps({"written_by": "evomerge", "files": files}, indent=1) + "\n")
        check_target(self.target, overwrite=self.overwrite, protected=self.protected)  # nothing changed meanwhile
        aside = None
        try:
            if self.target.is_dir() and any(self.target.iterdir()):
                aside = _sibling(self.target, "old")
                os.rename(self.target, aside)
            elif self.target.is_dir():
                os.rmdir(self.target)
            os.rename(self.staging, self.target)
        except OSError as exc:
            if aside is not None and not self.target.exists():
                os.rename(aside, self.target)
            raise EvomergeError(
                f"{self.target}: could not move the finished output into place ({exc.strerror})"
            ) from None
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
        return self.target

    def discard(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)
        for folder in reversed(self.created):
            try:
                folder.rmdir()  # only while still empty
            except OSError:
                break


def _owner() -> str:
    """This process, as `host-pid`, so a later run can tell a killed run's folders from a live one's."""
    host = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:24] or "host"
    return f"{host}-{os.getpid()}"


def _sibling(target: Path, kind: str) -> Path:
    """A hidden folder beside `target`: `.NAME.evomerge-KIND-HOST-PID-RANDOM`."""
    return target.with_name(f".{target.name[:60]}.evomerge-{kind}-{_owner()}-{uuid.uuid4().hex[:8]}")


def _dead_owner(folder: Path) -> bool:
    match = re.search(r"\.evomerge-(?:staging|old)-([A-Za-z0-9]+)-(\d+)-[0-9a-f]{8}$", folder.name)
    if not match or f"{match[1]}-{match[2]}" == _owner() or match[1] != _owner().split("-")[0]:
        return False  # not ours to judge: this process, or a run on another host
    try:
        os.kill(int(match[2]), 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def recover_killed_run(target: Path) -> None:
    """Tidy up after a run of this host that was killed (SIGKILL, power) while writing `target`:
    its staging folder goes; an old output it had set aside comes back if `target` is missing
    (killed mid-swap), else it goes too (the swap had finished)."""
    parent = target.parent
    if not parent.is_dir():
        return
    prefix = f".{target.name[:60]}.evomerge-"
    for folder in sorted(parent.glob(f"{glob.escape(prefix)}*")):
        if not folder.is_dir() or not _dead_owner(folder):
            continue
        if ".evomerge-old-" in folder.name and not target.exists():
            os.rename(folder, target)
        else:
            shutil.rmtree(folder, ignore_errors=True)


def prepare_output(
    target: Path, *, overwrite: bool = False, protected: Mapping[str, Iterable[Path]] | None = None
) -> StagedOutput:
    """Check `target` and create its staging folder (and any missing parents), before heavy work."""
    try:
        recover_killed_run(_resolved(Path(target)))
    except OSError:
        pass  # the checks below say what is wrong with the path
    check_target(Path(target), overwrite=overwrite, protected=protected)
    target = _resolved(Path(target))  # a symlinked output folder is replaced where it really is
    if target == target.parent:
        raise EvomergeError(f"{target}: the filesystem root cannot be an output directory")
    created: list[Path] = []
    missing = [p for p in [*reversed(target.parents)] if not p.exists()]
    try:
        for folder in missing:
            folder.mkdir()
            created.append(folder)
        staging = _sibling(target, "staging")
        staging.mkdir()  # mode 0o777 less the umask, as the final folder should have
    except OSError as exc:
        for folder in reversed(created):
            folder.rmdir()
        raise EvomergeError(f"{target}: cannot create the output directory ({exc.strerror})") from None
    return StagedOutput(target, staging, overwrite, dict(protected or {}), created)


@contextmanager
def staged_output(
    target: Path, *, overwrite: bool = False, protected: Mapping[str, Iterable[Path]] | None = None
) -> Iterator[StagedOutput]:
    """`prepare_output`, then discard on any exception; the caller commits when done."""
    staged = prepare_output(target, overwrite=overwrite, protected=protected)
    try:
        yield staged
    finally:
        if staged.staging.exists():  # failed or never committed: nothing of this run stays behind
            staged.discard()


def check_free_space(directory: Path, needed_bytes: int) -> None:
    """Refuse up front when the output cannot fit (the old output stays until the swap)."""
    free = shutil.disk_usage(directory).free
    if needed_bytes > free:
        raise EvomergeError(
            f"{directory}: needs {needed_bytes / 1e9:.2f} GB for the output but only {free / 1e9:.2f} GB is free"
        )
