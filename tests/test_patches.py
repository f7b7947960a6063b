"""The patch CLI on the real pinned llama.cpp tree: apply, status, idempotent re-apply, exact revert, dry runs,
and every refusal leaves the tree untouched with a non-zero exit and a message."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llama_megakernel import patching, pinned

SERIES = patching.all_series()[0]
TARGETS = list(SERIES.files)


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llama_megakernel", *args], capture_output=True, text=True,
                          timeout=1800)


def digest(tree: Path) -> dict[str, str]:
    return {str(p.relative_to(tree)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(tree.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("pristine") / "llama.cpp"
    r = cli("fetch-llama-cpp", str(d))
    assert r.returncode == 0, r.stderr
    assert "0c1e5709" in r.stdout
    return d


@pytest.fixture
def tree(pristine, tmp_path) -> Path:
    d = tmp_path / "llama.cpp"
    shutil.copytree(pristine, d)
    return d


def test_series_matches_the_pinned_tree():
    assert SERIES.commit == pinned.LLAMA_CPP_COMMIT and SERIES.ggml_version == pinned.GGML_VERSION
    src = pinned.ensure_tree()
    for f, hashes in SERIES.files.items():
        assert hashlib.sha256((src / f).read_bytes()).hexdigest() == hashes[0], f


def test_apply_status_reapply_revert_is_exact(tree, pristine):
    before = digest(tree)
    r = cli("patch", "status", str(tree))
    assert r.returncode == 0 and "clean" in r.stdout

    r = cli("patch", "apply", "--dry-run", str(tree))
    assert r.returncode == 0 and "dry run" in r.stdout
    assert digest(tree) == before

    r = cli("patch", "check", str(tree))
    assert r.returncode == 0 and "apply cleanly" in r.stdout

    r = cli("patch", "apply", str(tree))
    assert r.returncode == 0, r.stderr
    after = digest(tree)
    assert {k for k in after if after[k] != before.get(k)} == set(TARGETS)
    cu = (tree / "ggml/src/ggml-cuda/ggml-cuda.cu").read_text()
    assert "ggml_backend_cuda_set_graph_compute_hook" in cu and "ggml_backend_cuda_get_stream" in cu
    assert 'getenv("GGML_BACKEND_PATH")' in (tree / "src/llama.cpp").read_text()

    r = cli("patch", "status", str(tree))
    assert r.returncode == 0 and ": patched" in r.stdout
    r = cli("patch", "apply", str(tree))
    assert r.returncode == 0 and "already patched" in r.stdout
    assert digest(tree) == after

    r = cli("patch", "revert", "--dry-run", str(tree))
    assert r.returncode == 0 and digest(tree) == after
    r = cli("patch", "revert", str(tree))
    assert r.returncode == 0, r.stderr
    assert digest(tree) == before == digest(pristine)
    r = cli("patch", "revert", str(tree))
    assert r.returncode == 0 and "nothing to revert" in r.stdout


def _refused(tree: Path, action: str, expect: str):
    before = digest(tree)
    r = cli("patch", action, str(tree))
    assert r.returncode != 0
    assert expect in r.stderr, r.stderr
    assert "nothing was changed" in r.stderr or "not a llama.cpp tree" in r.stderr
    assert digest(tree) == before


def test_locally_modified_target_is_refused(tree):
    with open(tree / TARGETS[1], "a") as f:
        f.write("\n// a local edit\n")
    for action in ("apply", "check", "revert"):
        _refused(tree, action, "local modifications")


def test_partially_patched_tree_is_refused(tree):
    first = SERIES.dir / SERIES.patches[0]
    subprocess.run(["patch", "-s", "-p1", "-i", str(first)], cwd=tree, check=True)
    assert patching.status(tree).state == "partial"
    for action in ("apply", "check", "revert"):
        _refused(tree, action, "partially patched")


def test_unknown_llama_cpp_version_is_refused(tree):
    cm = tree / "ggml/CMakeLists.txt"
    cm.write_text(cm.read_text().replace("set(GGML_VERSION_MINOR 25)", "set(GGML_VERSION_MINOR 99)"))
    for f in TARGETS:
        with open(tree / f, "a") as fh:
            fh.write("\n// from another version\n")
    for action in ("apply", "check"):
        _refused(tree, action, "no patch series")


def test_not_a_llama_cpp_tree_is_refused(tmp_path):
    (tmp_path / "something").write_text("x")
    _refused(tmp_path, "apply", "not a llama.cpp tree")
    r = cli("patch", "status", str(tmp_path / "missing"))
    assert r.returncode != 0 and "not a llama.cpp tree" in r.stderr


def test_patched_tree_builds_for_cpu(tree, tmp_path):
    # ggml for the CPU backend, and the one llama source file the series changes (its object, not all of llama)
    assert cli("patch", "apply", str(tree)).returncode == 0
    r = cli("build-llama-cpp", str(tree), "--build-dir", str(tmp_path / "build"), "--target", "ggml",
            "--target", "src/CMakeFiles/llama.dir/llama.cpp.o", "-j", "2",
            "--cmake-arg=-DGGML_NATIVE=OFF", "--cmake-arg=-DLLAMA_BUILD_TOOLS=OFF")
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert list((tmp_path / "build").rglob("libggml.so*"))
    assert list((tmp_path / "build").rglob("llama.cpp.o"))


def test_install_llama_cpp_python_dry_run_patches_the_vendored_tree():
    r = cli("install-llama-cpp-python", "--cuda", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "applied 3 patches" in r.stdout and ": patched" in r.stdout
    assert "-DGGML_CUDA=on" in r.stdout and "pip install" in r.stdout
    assert "numpy" in r.stdout.split("dependencies:")[-1]  # and then what the sdist itself depends on
