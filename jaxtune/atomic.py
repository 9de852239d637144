"""Files and directories that appear whole or not at all, and never replace what jaxtune did not write.

A file is written to a temporary sibling and renamed into place (`write_file`, the one way jaxtune
writes a file atomically). A directory is built in a temporary sibling and renamed into place too. It
carries a marker file (`jaxtune_export.json`, saying what kind of directory it is), and only a directory
with the same marker — or an empty one — is ever replaced, and only when the caller says so: a user's `--out`
that names a run, a model or a folder of their own files is refused, never deleted.
"""
from __future__ import annotations

import glob
import io
import json
import os
import re
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from typing import IO, Callable, TypeVar

from jaxtune.errors import JaxtuneError
from jaxtune.paths import is_remote, run_path

MARKER = "jaxtune_export.json"
T = TypeVar("T")


def write_file(path: str | os.PathLike, write: Callable[[IO], T], *, binary: bool = False) -> T:
    """Call write(f) on a temporary sibling of `path`, then rename it into place: a crash or error leaves
    the old file (or none), never a partial one. Returns what `write` returns. Text is UTF-8.
    In a bucket one upload is atomic already: the content is built in memory and uploaded once."""
    if is_remote(path):
        buffer = io.BytesIO() if binary else io.StringIO()
        result = write(buffer)
        run_path(path).write_bytes(buffer.getvalue() if binary else buffer.getvalue().encode("utf-8"))
        return result
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") if binary else open(tmp, "w", encoding="utf-8") as f:
            result = write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return result


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a small text file atomically (see write_file)."""
    write_file(path, lambda f: f.write(text))


def marker_kind(directory: Path) -> str | None:
    """The kind recorded by jaxtune in `directory`, or None when jaxtune did not write it."""
    try:
        return json.loads((directory / MARKER).read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        return None


def check_replaceable(target: str | os.PathLike, kind: str, *, overwrite: bool, flag: str = "overwrite=True") -> None:
    """Refuse a target that holds anything but an earlier jaxtune directory of the same `kind`
    (or nothing), and an earlier one unless `overwrite`; `flag` is how the user says so."""
    target = Path(target)
    if not target.exists() and not target.is_symlink():
        return
    if not target.is_dir() or target.is_symlink():
        raise JaxtuneError(f"{target}: exists and is not a directory; choose another output path")
    if not any(target.iterdir()):
        return
    found = marker_kind(target)
    if found != kind:
        what = f"a jaxtune {found} directory" if found else "a directory jaxtune did not write"
        raise JaxtuneError(f"{target}: already exists and is {what}, not a {kind} export; jaxtune replaces only its "
                           f"own exports of the same kind: choose a new output path")
    if not overwrite:
        raise JaxtuneError(f"{target}: already holds a jaxtune {kind} export; pass {flag} to replace it")


def write_dir(target: str | os.PathLike, build, *, kind: str, overwrite: bool = False, keep_existing: bool = False,
              flag: str = "overwrite=True") -> Path:
    """Call build(tmp_dir), mark it as `kind` and rename it to `target`. An existing target is kept
    untouched (`keep_existing`, e.g. a cache) or replaced only as `check_replaceable` allows.
    A crash or error at any point leaves `target` as it was."""
    target = Path(target)
    if keep_existing and target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    clear_interrupted(target)
    check_replaceable(target, kind, overwrite=overwrite, flag=flag)
    tmp = Path(tempfile.mkdtemp(prefix=_scratch_prefix(target, "partial"), dir=target.parent))
    old = None
    try:
        build(tmp)
        (tmp / MARKER).write_text(json.dumps({"kind": kind}) + "\n")
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide the result from other users (e.g. a server)
        for f in tmp.rglob("*"):
            os.chmod(f, 0o755 if f.is_dir() else 0o644)
        if target.exists():  # checked above: empty, or our own export of this kind
            old = Path(tempfile.mkdtemp(prefix=_scratch_prefix(target, "old"), dir=target.parent))
            os.replace(target, old / target.name)
        os.replace(tmp, target)
    except BaseException:
        if old is not None and not target.exists():
            os.replace(old / target.name, target)  # put the previous export back
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return target


def _scratch_prefix(target: Path, what: str) -> str:
    """Name of write_dir's scratch directories beside `target`: which process made them, on which host."""
    return f".{target.name}.{what}-{os.getpid()}@{socket.gethostname()}-"


def clear_interrupted(target: Path) -> None:
    """Remove what a killed write_dir of `target` left beside it (SIGKILL, a power cut: no `finally`
    ran): its half-built directory, or put back a previous version it had moved aside. Only scratch of
    processes of this host that are gone is touched; a running one's is its own."""
    pattern = re.compile(re.escape(f".{target.name}.") + r"(partial|old)-(\d+)@(.+)-[^-]+$")
    for path in sorted(target.parent.glob(f".{glob.escape(target.name)}.*-*@*-*")):
        found = pattern.fullmatch(path.name)
        if not found or found[3] != socket.gethostname() or _alive(int(found[2])):
            continue
        moved_aside = path / target.name
        if found[1] == "old" and moved_aside.exists() and not target.exists():
            os.replace(moved_aside, target)
            print(f"{target}: put back the previous version, moved aside by an interrupted run (process {found[2]})",
                  file=sys.stderr)
        shutil.rmtree(path, ignore_errors=True)
        print(f"{target}: removed {path.name}, left by an interrupted run (process {found[2]})", file=sys.stderr)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
