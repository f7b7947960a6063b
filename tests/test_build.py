"""The plugin also builds and loads without CUDA (CI has nvcc, so the installed build is the CUDA one)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import run_py

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not on PATH")
def test_cpu_only_build_loads(tmp_path):
    b = tmp_path / "build"
    cfg = subprocess.run(["cmake", "-S", str(ROOT), "-B", str(b), "-DLLAMA_MK_CUDA=OFF", "-DCMAKE_BUILD_TYPE=Release"],
                         capture_output=True, text=True)
    assert cfg.returncode == 0, cfg.stdout + cfg.stderr
    assert "CPU-only build" in cfg.stdout
    bld = subprocess.run(["cmake", "--build", str(b), "-j2"], capture_output=True, text=True)
    assert bld.returncode == 0, bld.stdout[-3000:] + bld.stderr[-3000:]
    lib = b / "libggml-megakernel.so"
    r = run_py("import json, llama_megakernel as mk\nprint(json.dumps(mk.enable()))",
               env={"LLAMA_MEGAKERNEL_PLUGIN": str(lib)})
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout.strip().splitlines()[-1])
    assert info["cuda_compiled"] is False and info["cuda_devices"] is None
