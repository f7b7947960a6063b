"""The GPU check's harness, run where CI can run it (CPU only).

- scripts/mk-compare.cpp: built against llama-cpp-python's libllama and run on a tiny model. Without a GPU the
  plugin hands CUDA-less decode graphs back, so the "megakernel" runs equal stock exactly. The CPU-executor run
  (--cpu-steps) then compares the CPU executor with stock, through the same comparison code the GPU run uses.
- The committed GPU results: every results file has the keys of shared/design/results-schema.md, and the markdown
  twin of a file written by scripts/gpu_checks.py is what `gpu_checks.py --markdown` renders from the JSON.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tiny_model
from llama_megakernel import _native, pinned

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


@pytest.fixture(scope="module")
def mk_compare(tmp_path_factory) -> Path:
    import llama_cpp

    lib = Path(llama_cpp.__file__).parent / "lib"
    tree = Path(os.environ.get("LLAMA_CPP_DIR") or pinned.ensure_tree())
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    out = tmp_path_factory.mktemp("mk") / "mk-compare"
    cmd = [cxx, "-O1", "-std=c++17", str(ROOT / "scripts" / "mk-compare.cpp"), f"-I{tree / 'include'}",
           f"-I{tree / 'ggml' / 'include'}", f"-L{lib}", "-lllama", "-lggml-base", "-lggml", f"-Wl,-rpath,{lib}",
           "-o", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def run_compare(tool: Path, model: Path, *args: str) -> dict:
    env = dict(os.environ, GGML_BACKEND_PATH=str(_native.plugin_path()))
    r = subprocess.run([str(tool), str(model), *args], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("fa", [0, 1])
def test_mk_compare_on_cpu(mk_compare, fa):
    d = run_compare(mk_compare, tiny_model("llama", "Q4_0"), "--steps", "12", "--cpu-steps", "6", "--fa", str(fa),
                    "--seed", str(int.from_bytes(os.urandom(2), "little")))
    # no GPU executor here: the plugin's runs are stock's, bit for bit
    assert d["teacher_forced"]["steps"] == 12
    assert d["teacher_forced"]["min_cos"] == 1.0 and d["teacher_forced"]["max_abs"] == 0
    assert d["free_greedy_identical_steps"] == 12
    assert d["status_free"]["reasons"].get("executed", 0) == 0
    assert d["status_free"]["gpu_executor"] is False  # opt-in
    # the CPU executor ran every decode step of its run, and agrees with stock (tolerances: tests/test_compiler.py)
    cpu = d["cpu"]
    assert cpu["status"]["reasons"].get("executed") == 6
    assert cpu["stock_vs_cpu_executor"]["steps"] == 6 and cpu["stock_vs_cpu_executor"]["min_cos"] >= 0.999
    assert d["bytes_per_token"] > 0


def test_mk_compare_refuses_without_plugin(mk_compare):
    env = {k: v for k, v in os.environ.items() if k != "GGML_BACKEND_PATH"}
    r = subprocess.run([str(mk_compare), str(tiny_model("llama", "Q4_0")), "--steps", "2"], capture_output=True,
                       text=True, env=env, timeout=300)
    assert r.returncode == 2 and "plugin is not loaded" in r.stderr


REQUIRED = ("date", "commit", "llama_cpp_commit", "gpu", "driver", "commands", "rows", "correctness")


@pytest.mark.parametrize("path", sorted(RESULTS.glob("*.json")), ids=lambda p: p.name)
def test_results_files_have_the_schema_keys(path):
    d = json.loads(path.read_text())
    if "instructions" in d:  # a per-instruction profile, not a results file
        assert d["steps"] > 0 and d["step_us"] > 0
        return
    for k in REQUIRED:
        assert k in d, f"{path.name} lacks {k}"
    for row in d["rows"]:
        if "ratio" in row:
            assert abs(row["ratio"] - row["mk_tok_s"] / row["stock_tok_s"]) < 1e-3


def test_gpu_executor_results_markdown_matches_json():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import gpu_checks
    finally:
        sys.path.pop(0)
    for js in RESULTS.glob("*-gpu-executor*.json"):
        md = js.with_suffix(".md")
        assert md.read_text() == gpu_checks.markdown(json.loads(js.read_text()))
