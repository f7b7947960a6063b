"""Two models decoding at once in one process: the plugin keeps one program, one set of counters and one cache of
scans per backend, so interleaving the contexts' steps must give each exactly what it gets alone."""

from __future__ import annotations

import json

import numpy as np

from conftest import run_py, tiny_model

_CODE = """
import json, sys
import numpy as np
import llama_megakernel as mk
mk.enable(cpu_executor=True)
import llama_cpp

paths, order, steps = {paths!r}, {order!r}, {steps}
llms = [llama_cpp.Llama(model_path=p, n_ctx=256, n_threads=2, seed=0, verbose=False) for p in paths]
toks = [llm.tokenize(b"The quick brown fox") for llm in llms]
for llm, t in zip(llms, toks):
    llm.eval(t)
out = [[] for _ in llms]
for _ in range(steps):
    for k in order:  # each model's next step, in the order given
        llm = llms[k]
        row = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),)).copy()
        out[k].append(row)
        llm.eval([int(np.argmax(row))])
np.savez({npz!r}, *[np.stack(o) for o in out])
print(json.dumps(mk.status()))
"""


def _run(paths, order, steps, npz):
    r = run_py(_CODE.format(paths=[str(p) for p in paths], order=order, steps=steps, npz=str(npz)))
    assert r.returncode == 0, r.stderr[-3000:]
    z = np.load(npz)
    return [z[f"arr_{i}"] for i in range(len(paths))], json.loads(r.stdout.strip().splitlines()[-1])


def test_two_models_interleaved_match_each_alone(tmp_path):
    models = [tiny_model("llama", "Q4_K_M"), tiny_model("qwen3", "Q8_0")]
    steps = 16
    together, st = _run(models, [0, 1], steps, tmp_path / "both.npz")
    alone = [_run([m], [0], steps, tmp_path / f"alone{i}.npz")[0][0] for i, m in enumerate(models)]
    # each context's decode graphs ran in the plugin (the first logits come from the prompt, a batch>1 graph)
    assert st["reasons"].get("executed") == 2 * steps == st["graphs_handled"], st["reasons"]
    assert st["live_backends"] >= 2, st
    for i in range(2):
        assert np.array_equal(together[i], alone[i]), i
    # the bookkeeping per backend: each context's CPU backend has its own entry, program and count of steps
    cpu = [b for b in st["backends"] if b["device"] == "CPU"]
    assert len(cpu) == 2 and all(b["cuda_device"] == -1 and b["route"] == "intercept" for b in cpu), st["backends"]
    assert sorted(b["executed"] for b in cpu) == [steps, steps], st["backends"]
    assert all(b["program_instructions"] > 0 and not b["on_gpu"] for b in cpu), st["backends"]


def test_backend_entries_name_their_device(tmp_path):
    """Whatever devices this machine has (ggml's registry), a context offloaded nowhere gets a CPU backend entry;
    every entry's CUDA index is the one its backend name carries (CUDA<n>), -1 otherwise."""
    _, st = _run([tiny_model("llama", "Q8_0")], [0], 4, tmp_path / "one.npz")
    assert st["backends"], st
    for b in st["backends"]:
        name = b["device"]
        want = int(name[4:]) if name.startswith("CUDA") and name[4:].isdigit() else -1
        assert b["cuda_device"] == want, b
    assert sum(b["executed"] for b in st["backends"]) == st["reasons"].get("executed") == 4, st
