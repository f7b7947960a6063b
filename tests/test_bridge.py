"""The plugin loads through the bridge, registers as a ggml backend, refuses wrong versions, and the
environment-variable route turns it on for unchanged code."""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys

import pytest

import llama_megakernel as mk
from llama_megakernel import pinned

from conftest import OTHER_ARCHS, run_py


def test_plugin_is_a_ggml_backend_library():
    # What ggml_backend_load() checks in a stock llama.cpp tool: a non-zero score and a registry of API 2.
    path = mk.plugin_path()
    code = f"""
import ctypes, llama_cpp
lib = ctypes.CDLL({str(path)!r})
lib.ggml_backend_score.restype = ctypes.c_int
lib.ggml_backend_init.restype = ctypes.POINTER(ctypes.c_int)
reg = lib.ggml_backend_init()
print(lib.ggml_backend_score(), reg[0])
"""
    r = run_py(code)
    assert r.returncode == 0, r.stderr
    score, api_version = map(int, r.stdout.split())
    assert score > 0
    assert api_version == 2


def test_enable_loads_plugin_and_intercepts_cpu():
    code = """
import json, llama_megakernel as mk
info = mk.enable()
print(json.dumps({"info": info, "status": mk.status(), "regs": mk._loaded.registries()}))
"""
    r = run_py(code)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["info"]["api_version"] == 1
    assert out["info"]["ggml_runtime"] == pinned.GGML_VERSION
    assert out["info"]["built_against_llama_cpp"] == pinned.LLAMA_CPP_COMMIT
    assert "CPU" in out["status"]["intercepted_devices"]
    assert out["status"]["enabled"] is True
    assert "MEGAKERNEL" in out["regs"]
    assert out["status"]["graphs_seen"] == 0


@pytest.mark.parametrize("lcp, ggml, bad", [
    ("0.3.35", pinned.GGML_VERSION, "llama-cpp-python 0.3.35"),
    (pinned.LLAMA_CPP_PYTHON_VERSION, "0.26.0", "ggml 0.26.0"),
])
def test_check_versions_refuses_mismatch(lcp, ggml, bad):
    with pytest.raises(mk.IncompatibleVersionError) as e:
        mk.check_versions(lcp, ggml)
    msg = str(e.value)
    assert bad in msg and pinned.LLAMA_CPP_PYTHON_VERSION in msg and "pip install" in msg
    mk.check_versions(pinned.LLAMA_CPP_PYTHON_VERSION, pinned.GGML_VERSION)  # the pinned pair passes


def test_enable_with_mismatched_llama_cpp_python_changes_nothing():
    # Simulate another llama-cpp-python: enable() must refuse before the plugin is loaded.
    code = """
import llama_cpp, json
llama_cpp.__version__ = "0.3.99"
import llama_megakernel as mk
try:
    mk.enable()
    print("ENABLED")
except mk.IncompatibleVersionError as e:
    maps = open("/proc/self/maps").read()
    print(json.dumps({"error": str(e), "plugin_mapped": "libggml-megakernel" in maps, "status": mk.status()}))
"""
    r = run_py(code)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert "llama-cpp-python 0.3.99" in out["error"]
    assert out["plugin_mapped"] is False
    assert out["status"] == {"loaded": False, "enabled": False}


def test_env_var_enables_for_unchanged_code(smollm2):
    # The user's script never mentions llama_megakernel; only the environment does.
    user_code = f"""
import llama_cpp
llm = llama_cpp.Llama(model_path={str(smollm2)!r}, n_ctx=128, verbose=False)
out = llm.create_completion("Hello, my name is", max_tokens=4, temperature=0.0)
"""
    probe = "\nimport json, llama_megakernel as mk\nprint(json.dumps(mk.status()))\n"
    on = run_py(user_code + probe, env={"LLAMA_MEGAKERNEL": "1"})
    assert on.returncode == 0, on.stderr
    st = json.loads(on.stdout.strip().splitlines()[-1])
    assert st["loaded"] and st["enabled"]
    assert st["decode_graphs_seen"] == 3  # 4 tokens: the first comes from the prompt graph
    assert st["reasons"]["batch>1"] == 1

    off = run_py(user_code + probe)
    assert off.returncode == 0, off.stderr
    assert json.loads(off.stdout.strip().splitlines()[-1])["loaded"] is False


def test_disable_passes_graphs_through_uncounted(smollm2):
    code = f"""
import json, llama_megakernel as mk
mk.enable()
import llama_cpp
llm = llama_cpp.Llama(model_path={str(smollm2)!r}, n_ctx=128, verbose=False)
mk.disable()
llm.create_completion("Hello", max_tokens=3, temperature=0.0)
print(json.dumps(mk.status()))
"""
    r = run_py(code)
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout.strip().splitlines()[-1])
    assert st["enabled"] is False
    assert st["graphs_seen"] == 0
    assert st["graphs_while_disabled"] == 3


def test_cli_path_and_doctor():
    r = subprocess.run([sys.executable, "-m", "llama_megakernel", "path"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == str(mk.plugin_path())
    r = subprocess.run([sys.executable, "-m", "llama_megakernel", "doctor"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "interception: active on devices CPU" in r.stdout
    assert "batch>1" in r.stdout and "no-executor" in r.stdout
    # the architectures doctor lists are exactly those the tests verify end to end
    archs = next(line for line in r.stdout.splitlines() if line.startswith("architectures: "))
    assert sorted(archs.split(": ", 1)[1].split(", ")) == sorted(["llama", *OTHER_ARCHS]), archs
    types = next(line for line in r.stdout.splitlines() if line.startswith("weight types: "))
    assert types.split(": ", 1)[1].split(", ") == ["f32", "f16", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q4_K", "q5_K",
                                                   "q6_K", "bf16"], types


@pytest.mark.parametrize("cmd", [[], ["doctor"], ["path"], ["demo"], ["make-model"], ["explain"], ["bench"], ["patch"],
                                 ["fetch-llama-cpp"], ["build-llama-cpp"], ["install-llama-cpp-python"]])
def test_cli_help(cmd):
    # a bare '%' in a help string made every -h a TypeError traceback (argparse formats help with %)
    r = subprocess.run([sys.executable, "-m", "llama_megakernel", *cmd, "-h"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: llama-megakernel"), r.stdout
    assert "Traceback" not in r.stderr


def test_missing_plugin_is_a_clear_error(tmp_path):
    r = run_py("import llama_megakernel as mk\ntry:\n    mk.enable()\nexcept mk.MegakernelError as e:\n    print(e)",
               env={"LLAMA_MEGAKERNEL_PLUGIN": str(tmp_path / "nope.so")})
    assert r.returncode == 0
    assert "plugin library not found" in r.stdout
