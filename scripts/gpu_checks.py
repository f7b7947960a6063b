"""GPU checks run by scripts/gpu-check.sh on the GPU machine; writes a results file in the shape of
shared/design/results-schema.md.

1. Correctness through the Python bridge on CUDA: greedy decoding in a stock process and in a process with
   the plugin enabled, compared bit for bit, with the plugin's counters.
2. llama-bench, same binary, interleaved A/B: stock vs the plugin loaded through GGML_BACKEND_PATH.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def sh(cmd, env=None, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


def greedy(model: Path, steps: int, plugin: bool, tmp: Path) -> dict:
    out = tmp / f"{model.stem}-{'mk' if plugin else 'stock'}.npz"
    cmd = [sys.executable, "-m", "llama_megakernel.greedy", str(model), str(out), "--steps", str(steps), "--verbose"]
    if plugin:
        cmd.append("--plugin")
    env = dict(os.environ, PYTHONFAULTHANDLER="1")
    r = sh(["stdbuf", "-o0", "-e0"] + cmd, env=env)
    if r.returncode != 0:
        tail = "\n".join(l for l in r.stderr.splitlines() if "control token" not in l)[-2500:]
        raise RuntimeError(f"greedy failed (rc {r.returncode}): {' '.join(cmd)}\n{tail}")
    z = np.load(out)
    return {"tokens": z["tokens"], "logits": z["logits"], "status": json.loads(str(z["status"])), "cmd": cmd}


def check_bridge(model: Path, steps: int, tmp: Path) -> tuple[dict, list[str]]:
    stock = greedy(model, steps, False, tmp)
    mk = greedy(model, steps, True, tmp)
    st = mk["status"]
    cuda_decode = sum(g["calls"] for g in st["last_graphs"] if g["backend"].startswith("CUDA") and g["scan"]["decode"])
    res = {
        "model": model.stem, "check": f"bridge-greedy-{steps}-bitwise-identical-to-stock",
        "tokens_identical": bool(np.array_equal(stock["tokens"], mk["tokens"])),
        "logits_bitwise_identical": bool(np.array_equal(stock["logits"].view(np.uint32), mk["logits"].view(np.uint32))),
        "intercepted_devices": st["intercepted_devices"],
        "decode_graphs_seen": st["decode_graphs_seen"], "decode_graphs_on_cuda_in_last_graphs": cuda_decode,
        "reasons": st["reasons"],
    }
    res["passed"] = (res["tokens_identical"] and res["logits_bitwise_identical"]
                     and any(d.startswith("CUDA") for d in st["intercepted_devices"])
                     and st["decode_graphs_seen"] == steps - 1)
    return res, [" ".join(stock["cmd"]), " ".join(mk["cmd"])]


def bench_once(bench: str, model: Path, args: list[str], plugin: bool, status_file: Path) -> tuple[float, dict | None]:
    env = dict(os.environ)
    env.pop("GGML_BACKEND_PATH", None)
    if plugin:
        env["GGML_BACKEND_PATH"] = env["LLAMA_MEGAKERNEL_PLUGIN"]
        env["LLAMA_MEGAKERNEL_STATUS_FILE"] = str(status_file)
        status_file.unlink(missing_ok=True)
    cmd = [bench, "-m", str(model), "-o", "json"] + args
    r = sh(cmd, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"llama-bench failed: {' '.join(cmd)}\n{r.stderr[-3000:]}")
    rows = json.loads(r.stdout)
    assert len(rows) == 1, rows
    status = json.loads(status_file.read_text()) if plugin else None
    return float(rows[0]["avg_ts"]), status


def bench_ab(bench: str, model: Path, args: list[str], rounds: int, tmp: Path) -> dict:
    stock, mk, statuses = [], [], []
    for _ in range(rounds):  # A B A B ...
        stock.append(bench_once(bench, model, args, False, tmp / "st.json")[0])
        v, st = bench_once(bench, model, args, True, tmp / "st.json")
        mk.append(v)
        statuses.append(st)
    s, m = statistics.median(stock), statistics.median(mk)
    last = statuses[-1]
    return {"stock_tok_s": round(s, 1), "mk_tok_s": round(m, 1), "ratio": round(m / s, 4),
            "stock_runs": stock, "mk_runs": mk, "rounds": rounds,
            "plugin_intercepted": last["intercepted_devices"], "plugin_graphs_seen": last["graphs_seen"],
            "plugin_decode_graphs_seen": last["decode_graphs_seen"], "plugin_reasons": last["reasons"],
            "command": " ".join([bench, "-m", str(model)] + args)}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--models", required=True)
    p.add_argument("--bench", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    models = Path(a.models)
    tmp = Path(tempfile.mkdtemp())
    smi = sh(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"]).stdout.strip().split(", ")
    # The device's copy of the tree has no .git: the caller passes MK_COMMIT=$(git rev-parse --short=12 HEAD).
    commit = os.environ.get("MK_COMMIT") or sh(["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"]).stdout.strip() or "unknown"
    result = {"date": datetime.date.today().isoformat(), "commit": commit, "llama_cpp_commit": "0c1e5709",
              "gpu": smi[0], "driver": smi[1] if len(smi) > 1 else "", "commands": [], "rows": [],
              "correctness": [],
              "what": "interception only: the plugin recognises and hands back every graph (no executor yet); "
                      "mk_* columns are llama.cpp with the plugin loaded, i.e. the interception's overhead"}

    for name in ("llama-tiny-q4_0", "llama-smollm2-135m-q4_0"):
        try:
            res, cmds = check_bridge(models / f"{name}.gguf", 64, tmp)
            result["commands"] += cmds
        except RuntimeError as e:
            res = {"model": name, "check": "bridge-greedy-64-bitwise-identical-to-stock", "passed": False,
                   "error": str(e)}
        result["correctness"].append(res)
        print(json.dumps(res), flush=True)

    for name, test, args in [("llama-smollm2-135m-q4_0", "tg128", ["-p", "0", "-n", "128", "-r", "5"]),
                             ("llama-smollm2-135m-q4_0", "pp512", ["-p", "512", "-n", "0", "-r", "5"])]:
        row = {"model": name, "test": test, "depth": 0, "reps": 5}
        row.update(bench_ab(a.bench, models / f"{name}.gguf", args, a.rounds, tmp))
        result["rows"].append(row)
        result["commands"].append(row["command"] + "  (A: stock; B: GGML_BACKEND_PATH=<plugin>)")
        print(json.dumps(row), flush=True)

    Path(a.out).write_text(json.dumps(result, indent=1))
    ok = all(c["passed"] for c in result["correctness"])
    print(f"\n{'model':28s} {'test':6s} {'stock tok/s':>12s} {'plugin tok/s':>12s} {'ratio':>7s}")
    for r in result["rows"]:
        print(f"{r['model']:28s} {r['test']:6s} {r['stock_tok_s']:12.1f} {r['mk_tok_s']:12.1f} {r['ratio']:7.3f}")
    for c in result["correctness"]:
        print(f"{c['model']:28s} {c['check']}: {'PASS' if c['passed'] else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
