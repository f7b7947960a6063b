"""With the plugin enabled, llama-cpp-python produces exactly what stock llama.cpp produces, and the
plugin's counters show that every decode graph went through it (handed back, until an executor exists)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import greedy, tiny_model

STEPS = 32

CASES = [
    ("smollm2", None, False),
    ("llama", "Q4_0", False),
    ("llama", "Q4_K_M", True),     # flash attention on
    ("qwen3", "Q8_0", False),
    ("gemma3", "Q6_K", False),
    ("qwen35", "F16", False),
]


@pytest.mark.parametrize("arch, quant, fa", CASES, ids=[f"{a}-{q or 'real'}{'-fa' if fa else ''}" for a, q, fa in CASES])
def test_plugin_output_identical_to_stock(arch, quant, fa, smollm2, tmp_path):
    model = smollm2 if arch == "smollm2" else tiny_model(arch, quant)
    stock = greedy(model, tmp_path / "stock.npz", STEPS, plugin=False, flash_attn=fa)
    mk = greedy(model, tmp_path / "mk.npz", STEPS, plugin=True, flash_attn=fa)

    assert np.array_equal(stock["tokens"], mk["tokens"])
    assert np.isfinite(stock["logits"]).all()
    assert np.array_equal(stock["logits"].view(np.uint32), mk["logits"].view(np.uint32)), "logits differ bitwise"

    st = mk["status"]
    n_decode = STEPS - 1  # the first token comes from the prompt graph
    assert st["intercepted_devices"] == ["CPU"]
    assert st["decode_graphs_seen"] == n_decode, st
    assert st["reasons"].get("batch>1") == 1, st          # the prompt, handed back as prefill
    assert st["graphs_seen"] == n_decode + 1 + st["reasons"].get("no-weight-matmul", 0)
    assert st["graphs_handled"] == 0 and st["graphs_handed_back"] == st["graphs_seen"]
    prefill = [g for g in st["last_graphs"] if g["scan"]["reason"] == "batch>1"]
    assert prefill and prefill[0]["scan"]["n_tokens"] == mk["n_prompt"]
    decode = [g for g in st["last_graphs"] if g["scan"]["decode"]]
    assert decode and sum(g["calls"] for g in decode) == n_decode
