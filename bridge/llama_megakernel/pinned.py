"""The pinned llama.cpp tree: where it comes from and how to recognise it.

Standard library only: CMake runs this file as a script at build time (to find the ggml headers), and the
model factory, the CLI and the GPU script import it. The tree is never committed to this repository; it is
taken from ``LLAMA_CPP_DIR`` when set, otherwise from the llama-cpp-python sdist that vendors it, fetched
through pip into a cache once.

Offline: point ``LLAMA_CPP_DIR`` at a llama.cpp checkout of the pinned commit, or ``LLAMA_MEGAKERNEL_SDIST``
at a downloaded ``llama_cpp_python-0.3.36.tar.gz``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
LLAMA_CPP_COMMIT = "0c1e5709"
GGML_VERSION = "0.25.3"
SDIST_NAME = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"


class PinnedTreeError(RuntimeError):
    """The pinned llama.cpp tree could not be found, fetched or recognised."""


def cache_dir() -> Path:
    root = os.environ.get("LLAMA_MEGAKERNEL_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "llama-megakernel"


def _log(msg: str) -> None:
    print(f"[llama-megakernel] {msg}", file=sys.stderr, flush=True)


def sdist_path() -> Path:
    """The llama-cpp-python sdist, downloaded through pip on first use."""
    given = os.environ.get("LLAMA_MEGAKERNEL_SDIST")
    if given:
        p = Path(given)
        if not p.is_file():
            raise PinnedTreeError(f"LLAMA_MEGAKERNEL_SDIST={given} is not a file")
        return p
    dest = cache_dir() / "sdist"
    p = dest / SDIST_NAME
    if p.is_file():
        return p
    dest.mkdir(parents=True, exist_ok=True)
    _log(f"fetching the llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} sdist (pinned llama.cpp {LLAMA_CPP_COMMIT}) through pip")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "-d", str(dest)]
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if r.returncode != 0 or not p.is_file():
        raise PinnedTreeError(
            "could not download the llama-cpp-python sdist through pip:\n  " + " ".join(cmd) + "\n" + r.stdout[-2000:]
            + "\nOffline: set LLAMA_CPP_DIR to a llama.cpp tree at commit "
            + f"{LLAMA_CPP_COMMIT}, or LLAMA_MEGAKERNEL_SDIST to a downloaded {SDIST_NAME}.")
    return p


def ensure_tree() -> Path:
    """The vendored llama.cpp tree from the sdist, extracted into the cache once."""
    tree = cache_dir() / f"llama.cpp-{LLAMA_CPP_COMMIT}"
    if (tree / "ggml" / "include" / "ggml.h").is_file():
        return tree
    sdist = sdist_path()
    _log(f"extracting vendor/llama.cpp from {sdist.name} into {tree}")
    prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp/"
    tree.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=tree.parent))
    try:
        with tarfile.open(sdist) as tf:
            members = []
            for m in tf.getmembers():
                if not m.name.startswith(prefix) or not (m.isfile() or m.isdir()):
                    continue
                m.name = m.name[len(prefix):]
                # .git there is the sdist's submodule pointer, meaningless (and harmful to git) outside it
                if m.name and m.name != ".git":
                    members.append(m)
            tf.extractall(tmp, members=members, filter="data") if sys.version_info >= (3, 12) else tf.extractall(tmp, members=members)
        if not (tmp / "ggml" / "include" / "ggml.h").is_file():
            raise PinnedTreeError(f"{sdist} does not contain vendor/llama.cpp")
        try:
            tmp.rename(tree)
        except OSError:  # another process won the race
            if not (tree / "ggml" / "include" / "ggml.h").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return tree


def ggml_version_of(tree: Path) -> str | None:
    try:
        text = (tree / "ggml" / "CMakeLists.txt").read_text()
    except OSError:
        return None
    parts = [re.search(rf"set\(GGML_VERSION_{k}\s+(\d+)\)", text) for k in ("MAJOR", "MINOR", "PATCH")]
    if not all(parts):
        return None
    return ".".join(m.group(1) for m in parts)


def check_tree(tree: Path) -> Path:
    """Refuse anything that is not a llama.cpp tree with the pinned ggml version."""
    tree = Path(tree).resolve()
    needed = ["ggml/include/ggml.h", "ggml/include/ggml-backend.h", "ggml/src/ggml-backend-impl.h",
              "ggml/src/ggml-impl.h", "include/llama.h", "src/llama.cpp"]
    missing = [n for n in needed if not (tree / n).is_file()]
    if missing:
        raise PinnedTreeError(f"{tree} is not a llama.cpp tree (missing {', '.join(missing)})")
    v = ggml_version_of(tree)
    if v != GGML_VERSION:
        raise PinnedTreeError(
            f"{tree} has ggml {v or 'of unknown version'}; llama-megakernel is pinned to ggml {GGML_VERSION} "
            f"(llama.cpp {LLAMA_CPP_COMMIT}, llama-cpp-python {LLAMA_CPP_PYTHON_VERSION})")
    return tree


def llama_cpp_dir() -> Path:
    given = os.environ.get("LLAMA_CPP_DIR")
    return check_tree(Path(given) if given else ensure_tree())


def vocab_path(name: str) -> Path:
    """One of the tokenizer-only GGUF files under models/ of the pinned tree (e.g. 'llama-bpe')."""
    p = llama_cpp_dir() / "models" / f"ggml-vocab-{name}.gguf"
    if not p.is_file():
        raise PinnedTreeError(f"vocabulary file {p} not found in the pinned llama.cpp tree")
    return p


if __name__ == "__main__":
    # `python pinned.py tree` prints the checked tree's path (used by CMakeLists.txt).
    if sys.argv[1:] != ["tree"]:
        print("usage: pinned.py tree", file=sys.stderr)
        sys.exit(2)
    try:
        print(llama_cpp_dir())
    except PinnedTreeError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
