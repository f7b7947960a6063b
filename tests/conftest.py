"""Shared fixtures: synthetic models (built once per factory version and cached), subprocess runners."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from llama_megakernel import models, pinned

ARCHS = sorted(models.SHAPES)
# architectures besides llama whose decode graphs the plugin takes, verified end to end in test_compiler.py
OTHER_ARCHS = ["qwen2", "qwen3", "gemma3", "qwen35"]


def _model_cache() -> Path:
    # Keyed by the factory's own source: a change to the factory rebuilds every test model.
    digest = hashlib.sha256(Path(models.__file__).read_bytes()).hexdigest()[:12]
    root = pinned.cache_dir() / "test-models"
    d = root / digest
    if not d.is_dir():
        for old in root.glob("*"):  # models of an older factory (several GB each), unless another run is using them
            if time.time() - old.stat().st_mtime > 3600:
                shutil.rmtree(old, ignore_errors=True)
        d.mkdir(parents=True, exist_ok=True)
    return d


def tiny_model(arch: str, quant: str, vocab: str | None = None, head: str = "random") -> Path:
    """A tiny synthetic model of `arch`; quantized files come from the cached F32 base through llama.cpp.
    `vocab` takes the tokenizer (and the vocabulary size) from another vocab file of the pinned tree; `head` the
    output head (models.HEADS)."""
    d = _model_cache()
    tag = f"{arch}-tiny" + (f"-{vocab}" if vocab else "") + (f"-{head}" if head != "random" else "")
    base = d / f"{tag}-F32.gguf"
    if not base.is_file():
        models.make_model(arch, "tiny", "F32", base, vocab=vocab, head=head)
    if quant == "F32":
        return base
    out = d / f"{tag}-{quant}.gguf"
    if not out.is_file():
        tmp = out.with_suffix(f".tmp{os.getpid()}")
        models.quantize(base, tmp, quant)
        os.replace(tmp, out)
    return out


def run_py(code: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run Python code in a fresh interpreter (a process that never loaded the plugin unless it asks to)."""
    full_env = dict(os.environ)
    full_env.pop("LLAMA_MEGAKERNEL", None)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env,
                          timeout=timeout)


def greedy(model: Path, out: Path, steps: int, plugin: bool, flash_attn: bool = False,
           extra: list[str] | None = None) -> dict:
    args = [sys.executable, "-m", "llama_megakernel.greedy", str(model), str(out), "--steps", str(steps),
            "--threads", "2", *(extra or [])]
    if plugin:
        args.append("--plugin")
    if flash_attn:
        args.append("--flash-attn")
    env = dict(os.environ)
    env.pop("LLAMA_MEGAKERNEL", None)
    r = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, f"greedy run failed:\n{r.stdout}\n{r.stderr}"
    z = np.load(out)
    return {"tokens": z["tokens"], "n_prompt": int(z["n_prompt"]), "logits": z["logits"],
            "status": json.loads(str(z["status"]))}


@pytest.fixture(scope="session")
def smollm2() -> Path:
    try:
        return models.smollm2_path()
    except models.ModelFactoryError as e:
        pytest.fail(f"the embedded model is required for the tests: {e}")
