"""The auto mode (LLAMA_MEGAKERNEL_GPU=auto / LLAMA_MEGAKERNEL_CPU=auto, csrc/path-choice.h): each model's first
decode tokens alternate between the executor and stock, the faster median wins, and the choice holds for the model
from then on (after a new prompt too). Checked here on the CPU backend, where the same code picks between the CPU
executor and ggml-cpu: whichever wins, the tokens must be stock's and the counters must say what ran."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import greedy, run_py, tiny_model

STEPS, MORE = 48, 16

_CODE = """
import json
import numpy as np
import llama_megakernel as mk
mk.enable()  # the mode comes from LLAMA_MEGAKERNEL_CPU=auto
import llama_cpp

llm = llama_cpp.Llama(model_path={model!r}, n_ctx=512, n_threads=2, seed=0, verbose=False)
n_vocab = llm.n_vocab()

def decode(prompt, steps):
    toks, rows = llm.tokenize(prompt), []
    llm.eval(toks)
    for i in range(steps):
        row = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,)).copy()
        rows.append(row)
        toks.append(int(np.argmax(row)))
        if i + 1 < steps:
            llm.eval([toks[-1]])
    return toks, np.stack(rows)

toks, logits = decode(b"The quick brown fox", {steps})
first = mk.status()
llm.reset()
decode(b"A second prompt, after the choice", {more})
np.savez({npz!r}, tokens=np.array(toks, np.int32), logits=logits)
print(json.dumps({{"first": first, "second": mk.status()}}))
"""


def test_auto_mode_measures_both_paths_then_keeps_the_faster(tmp_path):
    model = tiny_model("llama", "Q8_0", head="successor")  # a decisive head: greedy tokens are a fair comparison
    stock = greedy(model, tmp_path / "stock.npz", STEPS, plugin=False)
    r = run_py(_CODE.format(model=str(model), steps=STEPS, more=MORE, npz=str(tmp_path / "auto.npz")),
               env={"LLAMA_MEGAKERNEL_CPU": "auto"})
    assert r.returncode == 0, r.stderr[-3000:]
    st = json.loads(r.stdout.strip().splitlines()[-1])
    first, second = st["first"], st["second"]
    z = np.load(tmp_path / "auto.npz")

    # what came out is stock's, whichever path computed each token
    assert z["tokens"].tolist() == stock["tokens"].tolist()
    a, b = z["logits"].astype(np.float64), stock["logits"].astype(np.float64)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() >= 0.999, cos

    assert first["cpu_mode"] == "auto" and first["gpu_mode"] == "off"
    (c,) = first["auto_choices"]  # one model
    n_exec, n_stock = c["samples"]
    assert n_exec >= 8 and n_stock >= 8, c
    assert c["choice"] in ("executor", "stock"), c
    assert (c["choice"] == "executor") == (c["executor_us"] < c["stock_us"]), c
    assert c["executor_us"] > 0 and c["stock_us"] > 0 and "measured" in c["why"], c
    rs = first["reasons"]
    decodes = STEPS - 1
    assert first["decode_graphs_seen"] == decodes == c["calls"], first
    executed, measuring, chose_stock = rs.get("executed", 0), rs.get("auto-measuring", 0), rs.get("auto-stock", 0)
    assert executed + measuring + chose_stock == decodes, rs
    # the paths alternate: 4 warm-up calls, then 8 intervals each (more only where a pause was dropped)
    assert 10 <= measuring <= 14, rs
    if c["choice"] == "stock":
        assert abs(executed - measuring) <= 1 and chose_stock == decodes - executed - measuring, rs
    else:
        assert chose_stock == 0 and executed == decodes - measuring, rs

    last = [g for g in first["last_graphs"] if g["scan"]["decode"]][-1]  # the latest verdict, not the first call's
    assert last["scan"]["reason"] == ("executed" if c["choice"] == "executor" else "auto-stock"), last

    # a new prompt: a new decode program of the same model takes the choice without measuring again
    (c2,) = second["auto_choices"]
    assert c2["choice"] == c["choice"] and c2["samples"] == c["samples"], (c, c2)
    assert second["reasons"].get("auto-measuring", 0) == measuring, second["reasons"]
    grew = {k: second["reasons"].get(k, 0) - rs.get(k, 0) for k in ("executed", "auto-stock")}
    path = "executed" if c["choice"] == "executor" else "auto-stock"
    assert grew[path] == MORE - 1 and sum(grew.values()) == MORE - 1, grew
    assert second["programs_compiled"] > first["programs_compiled"], second  # it was a new program


def test_executor_modes_are_checked():
    r = run_py("import llama_megakernel as mk\n"
               "try:\n    mk.enable(gpu_executor='fast')\nexcept ValueError as e:\n    print('refused:', e)\n"
               "print(mk.is_enabled())\n"
               "mk.enable(gpu_executor='auto', cpu_executor=False)\n"
               "s = mk.status()\nprint(s['gpu_mode'], s['cpu_mode'], s['gpu_executor'])\n")
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    assert lines[0].startswith("refused: executor mode 'fast'"), lines
    assert lines[1] == "False", lines  # a refused call changes nothing
    assert lines[2] == "auto off True", lines


@pytest.mark.parametrize("value,mode", [("1", "on"), ("0", "off"), ("auto", "auto"), ("", "off")])
def test_executor_mode_from_the_environment(value, mode):
    r = run_py("import llama_megakernel as mk\nmk.enable()\ns = mk.status()\nprint(s['gpu_mode'], s['cpu_mode'])\n",
               env={"LLAMA_MEGAKERNEL_GPU": value, "LLAMA_MEGAKERNEL_CPU": value})
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == f"{mode} {mode}"


def _choices(cases) -> list:
    code = ("import json, llama_cpp, llama_megakernel as mk\nn = mk._load()\n"
            f"print(json.dumps([n.op_test('path-choice', e, p, s, seed) for e, s, p, seed in {cases!r}]))\n")
    r = run_py(code)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_the_choice_on_a_synthetic_clock():
    """path_choice alone (op-test "path-choice"): token times of each path with +-10% jitter, fresh seeds."""
    seed = int(np.random.default_rng().integers(1 << 30))
    # (executor us, stock us, pause every n-th call (-1: a new program every call), seed)
    cases = [(800, 1000, 0, seed), (1000, 800, 0, seed + 1), (1000, 1000, 0, seed + 2), (700, 1000, 5, seed + 3),
             (1300, 1000, 3, seed + 4), (800, 1000, -1, seed + 5)]
    faster, slower, tie, paused_fast, paused_slow, unmeasurable = _choices(cases)
    for r in (faster, slower, tie, paused_fast, paused_slow):
        assert r["samples"][0] >= 8 and r["samples"][1] >= 8, r
        assert abs(r["executor_calls"] - r["stock_calls"]) <= 1, r  # they alternate
    assert faster["choice"] == "executor" and faster["calls"] == 20, faster  # 4 warm-up calls + 2 x 8 intervals
    assert 720 <= faster["executor_us"] <= 880 and 900 <= faster["stock_us"] <= 1100, faster
    assert slower["choice"] == "stock", slower
    # equal costs: a coin toss between jittered medians, but never a choice the medians do not support
    assert (tie["choice"] == "executor") == (tie["executor_us"] < tie["stock_us"]), tie
    # a 1 s pause after every 5th (3rd) call is not a token's cost: those intervals are dropped, the rest decide
    assert paused_fast["choice"] == "executor" and paused_fast["calls"] > 20, paused_fast
    assert paused_fast["executor_us"] < 800 and paused_fast["stock_us"] < 1150, paused_fast
    assert paused_slow["choice"] == "stock" and paused_slow["stock_us"] < 1150, paused_slow
    # nothing to measure: stock after k_give_up calls
    assert unmeasurable["choice"] == "stock" and unmeasurable["calls"] == 64, unmeasurable
    assert unmeasurable["samples"] == [0, 0], unmeasurable
