"""Apply, check and revert llama-megakernel's llama.cpp patches, all or nothing.

A tree is identified by the files the patches touch, not by a version string: each series (patches/<commit>/)
lists the sha256 of every target file before the first patch and after each patch. So the state of a tree is
exact: clean (every file as released), patched, partially patched (files at different steps), or modified (a
file matches no step: local edits or another llama.cpp version). Applying or reverting works on copies in a
temporary folder, checks the result against the recorded hashes, and only then replaces the files in the tree;
on any error the tree is left as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from . import pinned


class PatchError(RuntimeError):
    """The operation was refused; the tree was not changed."""


def patches_root() -> Path:
    here = Path(__file__).resolve().parent
    for cand in (here / "patches", here.parent.parent / "patches"):  # installed wheel, then source checkout
        if cand.is_dir():
            return cand
    raise PatchError("the patch series are missing from this installation")


@dataclass
class Series:
    dir: Path
    commit: str
    ggml_version: str
    patches: list[str]
    files: dict[str, list[str]]  # path -> sha256 before the first patch and after each patch

    @classmethod
    def load(cls, d: Path) -> "Series":
        m = json.loads((d / "series.json").read_text())
        return cls(d, m["llama_cpp_commit"], m["ggml_version"], m["patches"], m["files"])


def all_series() -> list[Series]:
    return [Series.load(d) for d in sorted(patches_root().iterdir()) if (d / "series.json").is_file()]


def _sha256(p: Path) -> str | None:
    try:
        return hashlib.sha256(p.read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


@dataclass
class TreeState:
    tree: Path
    series: Series | None
    state: str                              # clean, patched, partial, modified, unknown
    steps: dict[str, set[int]] = field(default_factory=dict)  # file -> how many patches it may have (empty: none)
    ggml_version: str | None = None

    def describe(self) -> str:
        n = len(self.series.patches) if self.series else 0
        head = f"{self.tree}: ggml {self.ggml_version or '?'}"
        if self.series is None:
            return f"{head}, unknown llama.cpp version (supported: {', '.join(s.commit for s in all_series())})"
        lines = [f"{head}, llama.cpp {self.series.commit}: {self.state}"]
        for f, ks in self.steps.items():
            what = ("modified (matches no known version)" if not ks else "patched" if n in ks else
                    "original" if 0 in ks else f"after patch {max(ks)} of {n}")
            lines.append(f"  {f}: {what}")
        return "\n".join(lines)


def _is_llama_cpp_tree(tree: Path) -> bool:
    return all((tree / p).is_file() for p in ("ggml/include/ggml.h", "include/llama.h", "src/llama.cpp",
                                              "ggml/CMakeLists.txt"))


def status(tree: str | os.PathLike) -> TreeState:
    tree = Path(tree).resolve()
    if not tree.is_dir() or not _is_llama_cpp_tree(tree):
        raise PatchError(f"{tree} is not a llama.cpp tree (expected ggml/include/ggml.h, include/llama.h, "
                         "src/llama.cpp)")
    ver = pinned.ggml_version_of(tree)
    best = None
    for s in all_series():
        # A file untouched by a patch has the same hash before and after it, so each file may be at several steps.
        steps = {}
        for f, hashes in s.files.items():
            h = _sha256(tree / f)
            steps[f] = {k for k, x in enumerate(hashes) if x == h}
        if not any(steps.values()) and ver != s.ggml_version:
            continue  # nothing of this series here: another llama.cpp
        if not all(steps.values()):
            state = "modified"
        elif all(0 in ks for ks in steps.values()):
            state = "clean"
        elif all(len(s.patches) in ks for ks in steps.values()):
            state = "patched"
        else:
            state = "partial"
        cand = TreeState(tree, s, state, steps, ver)
        if best is None or (best.state == "modified" and state != "modified"):
            best = cand
    return best or TreeState(tree, None, "unknown", {}, ver)


def _refuse_unless(st: TreeState, allowed: tuple[str, ...], action: str) -> None:
    if st.state in allowed:
        return
    why = {
        "unknown": "this llama.cpp version has no patch series",
        "modified": "target files have local modifications (or come from another llama.cpp version)",
        "partial": "the tree is partially patched",
    }.get(st.state, st.state)
    raise PatchError(f"cannot {action}: {why}; nothing was changed\n{st.describe()}")


def _git() -> str:
    git = shutil.which("git")
    if not git:
        raise PatchError("git is needed to apply patches (`git apply`); install git; nothing was changed")
    return git


def _transform(st: TreeState, reverse: bool) -> dict[str, bytes]:
    """The target files after applying (or reverting) the whole series, computed on copies."""
    s = st.series
    assert s is not None
    with tempfile.TemporaryDirectory(prefix="mk-patch-") as tmp:
        work = Path(tmp) / "tree"
        for f in s.files:
            (work / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(st.tree / f, work / f)
        env = dict(os.environ, GIT_CEILING_DIRECTORIES=tmp)  # never pick up a repository around the temp folder
        order = reversed(s.patches) if reverse else s.patches
        for p in order:
            cmd = [_git(), "apply", "-p1"] + (["-R"] if reverse else []) + [str(s.dir / p)]
            r = subprocess.run(cmd, cwd=work, capture_output=True, text=True, env=env)
            if r.returncode != 0:
                raise PatchError(f"{p} does not {'revert' if reverse else 'apply'} cleanly; nothing was changed\n"
                                 f"{r.stderr.strip()}")
        out = {f: (work / f).read_bytes() for f in s.files}
    want = 0 if reverse else len(s.patches)
    for f, data in out.items():
        if hashlib.sha256(data).hexdigest() != s.files[f][want]:
            raise PatchError(f"{f} does not come out as recorded in the series; nothing was changed")
    return out


def _write_all(tree: Path, contents: dict[str, bytes]) -> None:
    """Replace every file or none: stage each next to its target, then rename; undo on failure."""
    staged, done = {}, []
    originals = {f: (tree / f).read_bytes() for f in contents}
    try:
        for f, data in contents.items():
            tmp = tree / (f + ".mk-new")
            tmp.write_bytes(data)
            shutil.copymode(tree / f, tmp)
            staged[f] = tmp
        for f, tmp in staged.items():
            os.replace(tmp, tree / f)
            done.append(f)
    except OSError as e:
        for f in done:
            (tree / f).write_bytes(originals[f])
        raise PatchError(f"writing the patched files failed ({e}); the tree was restored") from e
    finally:
        for tmp in staged.values():
            if tmp.exists():
                tmp.unlink()


def _change(tree, reverse: bool, dry_run: bool) -> str:
    st = status(tree)
    if st.state == ("clean" if reverse else "patched"):
        return "not patched; nothing to revert" if reverse else \
            f"already patched (llama.cpp {st.series.commit}); nothing to do"
    verb = "revert" if reverse else "apply"
    _refuse_unless(st, ("patched" if reverse else "clean",), f"{verb} the patches")
    contents = _transform(st, reverse=reverse)
    n = len(st.series.patches)
    if dry_run:
        return f"would {verb} {n} patches in {len(contents)} files (dry run; nothing changed)"
    _write_all(st.tree, contents)
    if reverse:
        return f"reverted {n} patches; the files are as released"
    return f"applied {n} patches ({', '.join(st.series.patches)})"


def apply(tree, dry_run: bool = False) -> str:
    return _change(tree, reverse=False, dry_run=dry_run)


def revert(tree, dry_run: bool = False) -> str:
    return _change(tree, reverse=True, dry_run=dry_run)


def check(tree) -> str:
    """Succeeds if the tree is patched, or clean and the series applies cleanly."""
    st = status(tree)
    if st.state == "patched":
        return "patched"
    _refuse_unless(st, ("clean",), "patch this tree")
    _transform(st, reverse=False)
    return "clean; the patches apply cleanly"
