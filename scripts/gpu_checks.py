"""GPU checks run by scripts/gpu-check.sh on the GPU machine; writes a results file in the shape of
shared/design/results-schema.md.

The llama.cpp build is the patched one (the patches are additive: without the plugin it is stock llama.cpp), so
stock and megakernel run the same binary. Stages:
  correct   mk-compare (scripts/mk-compare.cpp) per model and flash-attention setting: stock greedy vs the plugin
            teacher-forced (logits cosine, top-1) and free-running (identical tokens), in one process
  depth     the same past 4096 tokens of context (prefill handed back, then decode across graph rebuilds)
  split     the same with llama.cpp's --split-mode tensor and row on this one GPU (what the plugin does with them)
  sanitize  compute-sanitizer memcheck and racecheck on a short decode
  bench     llama-bench, stock and plugin interleaved (A B A B), medians, ratio, % of the copy-bandwidth floor
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)


def sh(cmd, env=None, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, errors="replace", env=env, timeout=timeout)


def env_for(plugin: bool, status_file: Path | None = None, extra: dict | None = None) -> dict:
    env = dict(os.environ)
    for k in ("GGML_BACKEND_PATH", "LLAMA_MEGAKERNEL_STATUS_FILE"):
        env.pop(k, None)
    if plugin:
        env["GGML_BACKEND_PATH"] = env["LLAMA_MEGAKERNEL_PLUGIN"]
        env["LLAMA_MEGAKERNEL_GPU"] = "1"  # the GPU executor is opt-in
        if status_file:
            env["LLAMA_MEGAKERNEL_STATUS_FILE"] = str(status_file)
            status_file.unlink(missing_ok=True)
    env.update(extra or {})
    return env


def shown(cmd: list[str], env: dict | None) -> str:
    """A command as recorded in a results file, with the variables it ran under in front."""
    return " ".join([*(f"{k}={v}" for k, v in (env or {}).items()), *cmd])


def compare(tool: Path, model: Path, fa: int, steps: int, prompt: int = 8, cpu_steps: int = 0,
            timeout: int = 300, extra: list[str] | None = None, ref_cpu: int = 0, env: dict | None = None) -> dict:
    cmd = [str(tool), str(model), "--steps", str(steps), "--fa", str(fa), "--prompt", str(prompt), *(extra or [])]
    if cpu_steps:
        cmd += ["--cpu-steps", str(cpu_steps)]
    if ref_cpu:
        cmd += ["--ref-cpu", str(ref_cpu)]
    if prompt + steps > 4000:
        cmd += ["--ctx", str(prompt + steps + 256)]
    r = sh(cmd, env=env_for(True, extra=env), timeout=timeout)
    res = {"model": model.stem, "flash_attn": fa, "steps": steps, "prompt": prompt,
           "command": shown(cmd, env)}
    if r.returncode != 0 or not r.stdout.strip():
        res.update(passed=False, error=(r.stderr or "")[-2000:], rc=r.returncode)
        return res
    d = json.loads(r.stdout.strip().splitlines()[-1])
    tf, sf, sb = d["teacher_forced"], d["status_free"], d["status_forced"]
    res.update(teacher_forced=tf, free_greedy_identical_steps=d["free_greedy_identical_steps"],
               bytes_per_token=d.get("bytes_per_token"),
               executed=sf["reasons"].get("executed", 0), reasons=sf["reasons"],
               gpu_failures=sf.get("gpu_failures"), last_gpu_error=sf.get("last_gpu_error"),
               programs_compiled=sf.get("programs_compiled"))
    res["executed_forced"] = sb["reasons"].get("executed", 0)
    if d.get("cpu"):
        res["gpu_vs_cpu_executor"] = d["cpu"]["gpu_vs_cpu_executor"]
        res["stock_vs_cpu_executor"] = d["cpu"]["stock_vs_cpu_executor"]
        res["cpu_executed"] = d["cpu"]["status"]["reasons"].get("executed", 0)
    if d.get("ref_cpu"):  # stock CUDA against stock ggml-cpu: how far two stock implementations differ
        res["stock_cuda_vs_stock_cpu"] = d["ref_cpu"]["stock_cuda_vs_stock_cpu"]
        res["megakernel_vs_stock_cpu"] = d["ref_cpu"]["megakernel_vs_stock_cpu"]
        if "free_greedy_identical_steps" in d["ref_cpu"]:
            res["stock_cpu_free_greedy_identical_steps"] = d["ref_cpu"]["free_greedy_identical_steps"]
    if d.get("two_contexts"):
        res["two_contexts"] = {k: v for k, v in d["two_contexts"].items() if k != "status"}
        st2 = d["two_contexts"]["status"]
        res["two_contexts"].update(executed=st2["reasons"].get("executed", 0), gpu_failures=st2.get("gpu_failures"),
                                   last_gpu_error=st2.get("last_gpu_error"),
                                   backends=[b for b in st2.get("backends", []) if b["executed"]])
    # every decode step of the forced and the free run through the megakernel, none handed back with an error
    ran = res["executed"] >= 2 * steps - 2 and sf.get("gpu_failures", 1) == 0
    res["passed"] = bool(ran and tf["min_cos"] >= 0.999 and tf["top1_agree"] >= 0.99
                         and ("gpu_vs_cpu_executor" not in res or res["gpu_vs_cpu_executor"]["min_cos"] >= 0.999))
    return res


# At least 160 cells per attention split: at 256 cells of context the tiny model's attention has splits of 160 and 96
# cells per KV head (10 and 6 cells a warp in attn_tile_warps; with LLAMA_MEGAKERNEL_ATTN_WARPS=0, chunks of 128 and
# 32), as only long contexts have otherwise.
LONG_SPLITS = {"LLAMA_MEGAKERNEL_ATTN_MIN_CELLS": "160"}


def sanitize(tool: Path, model: Path, which: str, env: dict | None = None, suffix: str = "") -> dict:
    cmd = ["compute-sanitizer", "--tool", which, "--print-limit", "20", str(tool), str(model), "--steps", "4",
           "--prompt", "4"]
    check = f"compute-sanitizer-{which}{suffix}"
    try:
        # stock's CUDA graphs off: their (handled) cudaGraphExecUpdate failures are reported as API errors
        r = sh(cmd, env=env_for(True, extra={"LLAMA_MEGAKERNEL_WAIT_TIMEOUT_MS": "300000", "GGML_CUDA_DISABLE_GRAPHS": "1",
                                             **(env or {})}),
               timeout=int(os.environ.get("MK_SANITIZE_TIMEOUT", "560")))
    except subprocess.TimeoutExpired:
        return {"model": model.stem, "check": check, "command": shown(cmd, env), "passed": False,
                "error": "timed out"}
    text = r.stdout + r.stderr
    m = (re.search(r"ERROR SUMMARY: (\d+) error", text)
         or re.search(r"RACECHECK SUMMARY: \d+ hazards? displayed \((\d+) error", text))
    ran = '"executed"' in r.stdout
    res = {"model": model.stem, "check": check, "command": shown(cmd, env),
           "errors": int(m.group(1)) if m else None, "megakernel_ran": ran, "rc": r.returncode,
           "report": [ln for ln in text.splitlines() if ln.startswith("=========")][:80]}
    res["passed"] = bool(m and int(m.group(1)) == 0 and ran and r.returncode == 0)
    return res


def plugin_summary(status_file: Path) -> dict | None:
    if not status_file.is_file():
        return None
    st = json.loads(status_file.read_text())
    keys = ("gpu_steps", "gpu_failures", "last_gpu_error", "gpu_loads", "gpu_load_ms", "planar_bytes",
            "gpu_hook_us_per_step", "gpu_run_us_per_step", "gpu_kernel_us_per_step", "auto_choices")
    return {"routes": st["routes"], "reasons": st["reasons"], **{k: st.get(k) for k in keys}}


def env_arms(var: str) -> list[tuple[str, dict]]:
    """The arms named in environment variable `var` as "name:VAR=value,VAR=value;name2:...": the plugin with those
    variables (A/B of a switch in the same run, on the same binary)."""
    out = []
    for spec in filter(None, os.environ.get(var, "").split(";")):
        name, _, pairs = spec.partition(":")
        out.append((name, dict(p.split("=", 1) for p in pairs.split(",") if p)))
    return out


def bench_variants() -> list[tuple[str, dict]]:
    """MK_BENCH_VARIANT: the llama-bench arms besides stock and the plugin as it is (env_arms)."""
    return env_arms("MK_BENCH_VARIANT")


def bench(bindir: Path, model: Path, test: str, args: list[str], rounds: int, tmp: Path) -> dict:
    variants = bench_variants()
    env_of = {f"mk_{n}": e for n, e in variants}
    arms = ["stock", "mk"] + list(env_of)
    runs = {c: [] for c in arms}
    summaries = {}
    cmd = [str(bindir / "llama-bench"), "-m", str(model), "-o", "json", "-ngl", "99"] + args
    for i in range(rounds):
        for c in arms[i % len(arms):] + arms[:i % len(arms)]:  # A B, B A (A B C, B C A, C A B)
            sf = tmp / "bench-status.json"
            sf.unlink(missing_ok=True)
            r = sh(cmd, env=env_for(c != "stock", sf, env_of.get(c)))
            if r.returncode != 0:
                raise RuntimeError(f"llama-bench ({c}) failed: {r.stderr[-2000:]}")
            runs[c].append(float(json.loads(r.stdout)[0]["avg_ts"]))
            if c != "stock":
                summaries[c] = plugin_summary(sf)
    med = {c: statistics.median(v) for c, v in runs.items()}
    row = {"model": model.stem, "test": test, "reps": 5, "rounds": rounds,
           "stock_tok_s": round(med["stock"], 1), "mk_tok_s": round(med["mk"], 1),
           "ratio": round(med["mk"] / med["stock"], 4), "runs": runs, "plugin": summaries.get("mk"),
           "command": " ".join(cmd) + "  (stock, then GGML_BACKEND_PATH=<plugin>; order alternated each round)"}
    for c in env_of:
        row[f"{c}_tok_s"] = round(med[c], 1)
        row[f"{c}_ratio"] = round(med[c] / med["stock"], 4)
        row[f"{c}_plugin"] = summaries.get(c)
    if len(variants) == 1:  # the shape of the files from before several arms
        row["variant"] = {"name": variants[0][0], "env": variants[0][1]}
    elif variants:
        row["variants"] = [{"name": n, "env": e} for n, e in variants]
    return row


def copy_bandwidth() -> float | None:
    """Device-to-device copy, bytes read + written per second, through PyTorch (the GPU image has it)."""
    code = ("import torch,time\n"
            "a=torch.empty(1<<30,dtype=torch.uint8,device='cuda');b=torch.empty_like(a)\n"
            "for _ in range(3): b.copy_(a)\n"
            "torch.cuda.synchronize();t=time.perf_counter()\n"
            "for _ in range(20): b.copy_(a)\n"
            "torch.cuda.synchronize();print(2*20*(1<<30)/(time.perf_counter()-t)/1e9)\n")
    r = sh(["python3", "-c", code], env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, timeout=120)
    try:
        return round(float(r.stdout.strip().splitlines()[-1]), 1)
    except (ValueError, IndexError):
        return None


def markdown(result: dict) -> str:
    """The markdown twin of a results file (bench/results/*.md)."""
    r = result
    o = [f"# {r['date']} {r['gpu']}: the GPU executor against stock llama.cpp", "",
         f"Commit {r['commit']}, llama.cpp {r['llama_cpp_commit']} + patches/{r['llama_cpp_commit']} (one binary; the "
         f"plugin loaded through GGML_BACKEND_PATH or not), driver {r['driver']}"
         + (f", copy bandwidth {r['copy_bandwidth_gbs']} GB/s (read + write, device-to-device copy)."
            if r.get("copy_bandwidth_gbs") else "."), "",
         "## llama-bench (medians; stock and megakernel alternated A B / B A each round)", ""]
    if r.get("about"):  # (older files' "note" is not rendered: their markdown predates it)
        o[2:2] = [r["about"], ""]
    vs = next(([x["variant"]] if x.get("variant") else x["variants"] for x in r["rows"]
               if x.get("variant") or x.get("variants")), [])
    if len(vs) == 1:
        o += [f"Third arm `{vs[0]['name']}`: the same plugin with "
              + ", ".join(f"`{k}={v}`" for k, v in vs[0]["env"].items()) + ", rotated with the other two.", ""]
    elif vs:
        o += ["More arms, the same plugin with: " + "; ".join(
            f"`{v['name']}`: " + ", ".join(f"`{k}={e}`" for k, e in v["env"].items()) for v in vs)
            + "; all rotated together.", ""]
    if r["rows"]:
        o += ["| model | test | depth | stock tok/s | megakernel tok/s | ratio | bytes/token | stock % of floor | mk % of floor |"
              + "".join(f" {v['name']} tok/s | {v['name']} ratio |" for v in vs),
              "|---|---|---|---|---|---|---|---|---|" + "---|---|" * len(vs)]
    elif r.get("bench_files"):
        o += ["This run had no bench stage; the llama-bench comparison of the same commit is in "
              + ", ".join(r["bench_files"]) + "."]
    for x in r["rows"]:
        if "ratio" not in x:
            o.append(f"| {x['model']} | {x['test']} | {x.get('depth', 0)} | error: {x.get('error', '')[:80]} | | | | | |")
            continue
        b = x.get("bytes_per_token")
        o.append(f"| {x['model']} | {x['test']} | {x.get('depth', 0)} | {x['stock_tok_s']:.1f} | {x['mk_tok_s']:.1f} | "
                 f"{x['ratio']:.3f} | {f'{b / 1e6:.1f} MB' if b else '-'} | {x.get('stock_pct_floor', '-')} | "
                 f"{x.get('mk_pct_floor', '-')} |"
                 + "".join(f" {x.get('mk_' + v['name'] + '_tok_s', '-')} | {x.get('mk_' + v['name'] + '_ratio', '-')} |"
                           for v in vs))
    timed = [(x, c, p) for x in r["rows"] for c, p in [("mk", x.get("plugin"))] + [
        (k[:-len("_plugin")], v) for k, v in x.items() if k.startswith("mk_") and k.endswith("_plugin")]
        if p and p.get("gpu_kernel_us_per_step") and x.get(f"{c}_tok_s")]
    if timed:
        o += ["", "Where a token's time goes, from the arms whose plugin timed its kernel with CUDA events "
              "(`LLAMA_MEGAKERNEL_TIMING=1`): 1/tok/s is one llama_decode call of llama-bench's generation loop.", ""]
        for x, c, p in timed:
            tok_us = 1e6 / x[f"{c}_tok_s"]
            o.append(f"- {x['model']} {x['test']} ({c}): {tok_us:.0f} us per token, kernel "
                     f"{p['gpu_kernel_us_per_step']} us, in the plugin's hook {p['gpu_hook_us_per_step']} us, "
                     f"outside the kernel {tok_us - p['gpu_kernel_us_per_step']:.0f} us")
    o += ["", "## Correctness (mk-compare: one process, stock greedy vs the megakernel)", "",
          "Teacher-forced: the megakernel fed stock's tokens, logits compared per step. Free: its own greedy tokens, "
          "identical to stock's up to the step shown. GPU vs CPU executor: the same program run by the CPU executor "
          "(model loaded without offload), teacher-forced.", "",
          "| model | check | passed | min cos | top-1 | free greedy identical steps | GPU vs CPU executor min cos |",
          "|---|---|---|---|---|---|---|"]
    ref = any(c.get("stock_cuda_vs_stock_cpu") for c in r["correctness"])
    if ref:  # (files from before the stock-against-stock reference keep their table)
        o[-4] += (" The last two columns: stock CUDA against stock ggml-cpu on the same model, teacher-forced with "
                  "the same tokens over the same steps, i.e. how far two stock implementations differ.")
        o[-2] += " stock CUDA vs stock CPU min cos | top-1 |"
        o[-1] += "---|---|"
    greedy = any(c.get("stock_cpu_free_greedy_identical_steps") for c in r["correctness"])
    if greedy:
        o[-4] += (" Stock CPU greedy: stock ggml-cpu's own greedy tokens, identical to stock CUDA's / to the "
                  "megakernel's up to the step shown.")
        o[-2] += " stock CPU greedy identical (vs stock CUDA / vs megakernel) |"
        o[-1] += "---|"
    for c in r["correctness"]:
        tf = c.get("teacher_forced") or {}
        gc = c.get("gpu_vs_cpu_executor") or {}
        if "sanitizer" in c.get("check", ""):
            o.append(f"| {c['model']} | {c['check']} | {'yes' if c['passed'] else 'NO'} | errors: {c.get('errors')} | "
                     f"megakernel ran: {c.get('megakernel_ran')} | | |" + (" | |" if ref else ""))
            continue
        rc = c.get("stock_cuda_vs_stock_cpu") or {}
        gs = c.get("stock_cpu_free_greedy_identical_steps")
        greedy_col = (f" {gs['stock_cuda_vs_stock_cpu']} / {gs['megakernel_vs_stock_cpu']} |" if gs else " - |") if greedy else ""
        o.append(f"| {c['model']} | {c.get('check', '')} | {'yes' if c.get('passed') else 'NO'} | "
                 f"{tf.get('min_cos', float('nan')):.5f} | {tf.get('top1_agree', float('nan')):.4f} | "
                 f"{c.get('free_greedy_identical_steps')} | {gc.get('min_cos', '-')} |"
                 + (f" {rc['min_cos']:.5f} | {rc['top1_agree']:.4f} |" if rc else " - | - |" if ref else "")
                 + greedy_col)
    if r.get("bisect"):
        o += ["", "## Which matrices (the 1B shape in BF16 with one group quantized, fa off, teacher-forced)", "",
              "| type | quantized | file MiB | megakernel vs stock CUDA min cos | top-1 | greedy identical | stock CUDA vs "
              "stock CPU min cos | top-1 | greedy identical | megakernel vs stock CPU min cos |",
              "|---|---|---|---|---|---|---|---|---|---|"]
        for c in r["bisect"]:
            tf, rc, mc = (c.get(k) or {} for k in ("teacher_forced", "stock_cuda_vs_stock_cpu", "megakernel_vs_stock_cpu"))
            gs = c.get("stock_cpu_free_greedy_identical_steps") or {}
            o.append(f"| {c['check'].split('-')[1]} | {', '.join(c.get('quantized', []))} | {c.get('file_mib', '-')} | "
                     f"{tf.get('min_cos', '-')} | {tf.get('top1_agree', '-')} | {c.get('free_greedy_identical_steps')} | "
                     f"{rc.get('min_cos', '-')} | {rc.get('top1_agree', '-')} | {gs.get('stock_cuda_vs_stock_cpu', '-')} | "
                     f"{mc.get('min_cos', '-')} |")
    if r.get("profiles"):
        o += ["", "## Step time inside the kernel (LLAMA_MEGAKERNEL_PROFILE, 64 steps)", ""]
        for k, v in r["profiles"].items():
            o.append(f"- {k}: {v['step_us']} us per step ({v['file']})")
    o += ["", "Commands:", ""] + [f"- `{c}`" for c in r["commands"] if c]
    return "\n".join(o) + "\n"


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--markdown":
        print(markdown(json.loads(Path(sys.argv[2]).read_text())), end="")
        return 0
    p = argparse.ArgumentParser()
    p.add_argument("--models", required=True)
    p.add_argument("--bin", required=True)
    p.add_argument("--compare", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--stages", nargs="*", default=["correct", "depth", "sanitize", "bench"])
    p.add_argument("--rounds", type=int, default=4)
    a = p.parse_args()
    M, bindir, tool = Path(a.models), Path(a.bin), Path(a.compare)
    tmp = Path(tempfile.mkdtemp())
    smi = sh(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"]).stdout.strip().split(", ")
    result = {"date": datetime.date.today().isoformat(), "commit": os.environ.get("MK_COMMIT") or "unknown",
              "llama_cpp_commit": "0c1e5709", "gpu": smi[0], "driver": smi[1] if len(smi) > 1 else "",
              "commands": [], "rows": [], "correctness": [], "stages": a.stages}
    out = Path(a.out)

    def save():
        out.write_text(json.dumps(result, indent=1))

    def have(name):
        return (M / f"{name}.gguf").is_file()

    # stock CUDA against stock ggml-cpu beside the comparisons of the models MK_REF_CPU matches (a regex; default
    # every model, empty: none): the spread between two stock implementations, against which the megakernel's
    # distance from stock CUDA can be read
    ref_re = os.environ.get("MK_REF_CPU", ".")

    def ref_cpu(name: str, steps: int) -> int:
        return steps if ref_re and re.search(ref_re, name) else 0
    if "correct" in a.stages:
        plan = [("llama-tiny-Q4_0", 64, 32), ("llama-tiny-F16", 64, 32), ("llama-tiny-Q4_K_M", 64, 32)]
        # every type made of these shapes (MK_*_TYPES), in a fixed order, not a list of types here: a list missed
        # session 23's Q5 models for a call; the F32 files are make-model's bases, not test models
        for prefix, steps, cpu in (("llama-tiny-successor", 64, 32), ("llama-smollm2-135m", 256, 0),
                                   ("llama-llama-3.2-1b", 256, 0)):
            plan += [(f.stem, steps, cpu) for f in sorted(M.glob(f"{prefix}-*.gguf"))
                     if f.stem.rsplit("-", 1)[1] != "F32" and f.stem.count("-") == prefix.count("-") + 1]
        plan += [("smollm2-135m-real-Q4_1", 256, 0)]
        for spec in os.environ.get("MK_ARCH_MODELS", "").split():  # arch:shape:base:types, as gpu-check.sh
            arch, shape, _, types = spec.split(":")
            # tiny shapes: also GPU against the CPU executor on the same program, as the llama tiny models
            plan += [(f"{arch}-{shape}-{q}", 64 if shape == "tiny" else 256, 32 if shape == "tiny" else 0)
                     for q in types.split(",")]
        only = re.compile(os.environ.get("MK_CORRECT_ONLY", ""))  # e.g. "real": only the models whose name matches
        # the tiny Q4_0 model once more with long attention splits (LONG_SPLITS)
        arms = {"long-splits": LONG_SPLITS}
        plan_default = list(plan)
        plan += [("llama-tiny-Q4_0", 64, 32, "long-splits")]
        # MK_CORRECT_VARIANTS="name:VAR=v,VAR2=w;name2:...": every checked model once more with the plugin's VARs (to
        # find which switch moves a model's agreement with stock)
        for spec in filter(None, os.environ.get("MK_CORRECT_VARIANTS", "").split(";")):
            vname, _, assigns = spec.partition(":")
            arms[vname] = dict(kv.split("=", 1) for kv in assigns.split(",") if kv)
            plan += [(n, st, c, vname) for n, st, c in plan_default]
        for name, steps, cpu, *arm in plan:
            if not have(name) or not only.search(name):
                continue
            for fa in (0, 1):
                try:
                    res = compare(tool, M / f"{name}.gguf", fa, steps, cpu_steps=cpu, ref_cpu=ref_cpu(name, steps),
                                  env=arms[arm[0]] if arm else None)
                except subprocess.TimeoutExpired:
                    res = {"model": name, "flash_attn": fa, "passed": False, "error": "timeout"}
                res["check"] = f"vs-stock-{steps}-steps-fa{fa}" + (f"-{arm[0]}" if arm else "")
                result["correctness"].append(res)
                log(f"{name} fa={fa}: " + json.dumps({k: res.get(k) for k in (
                    "passed", "teacher_forced", "free_greedy_identical_steps", "executed", "gpu_failures",
                    "last_gpu_error", "gpu_vs_cpu_executor", "error")}))
                save()

    # two models, two contexts on one GPU, decoding in turn: each gets bit for bit what it got alone
    pair = os.environ.get("MK_TWO_MODELS", "llama-llama-3.2-1b-Q4_0 llama-smollm2-135m-Q4_0").split()
    if "two" in a.stages and all(have(n) for n in pair):
        for fa in (0, 1):
            res = compare(tool, M / f"{pair[0]}.gguf", fa, 64, extra=["--with", str(M / f"{pair[1]}.gguf")])
            res["check"] = f"two-contexts-one-gpu-fa{fa}"
            tc = res.get("two_contexts") or {}
            # the bookkeeping: one entry per context's CUDA backend, each with its program on the GPU; the first
            # context ran the 64 interleaved steps, the second also its 64 alone before them
            be = tc.get("backends") or []
            books = (sorted(b["executed"] for b in be) == [64, 128]
                     and all(b["device"] == "CUDA0" and b["cuda_device"] == 0 and b["on_gpu"] for b in be))
            res["backends_bookkeeping"] = books
            res["passed"] = bool(tc and tc["first_alone_vs_together"]["max_abs"] == 0
                                 and tc["second_alone_vs_together"]["max_abs"] == 0
                                 and tc["executed"] >= 3 * 64 - 2 and tc["gpu_failures"] == 0 and books)
            result["correctness"].append(res)
            log(f"two contexts fa={fa}: " + json.dumps({k: res.get(k) for k in ("passed", "two_contexts", "error")}))
            save()

    # llama.cpp's other split modes on this one GPU: what the plugin does with their graphs (tensor: per-device
    # subgraphs through ggml's meta backend; row: ggml-cuda offers no split buffer type at the pinned commit). Passed:
    # the run completed and the tokens agree with stock's as in the correct stage, whether the plugin ran the steps
    # or handed them back (the reasons are recorded)
    split_model = os.environ.get("MK_SPLIT_MODEL", "llama-llama-3.2-1b-Q4_0")
    if "split" in a.stages and have(split_model):
        for mode in ("tensor", "row"):
            res = compare(tool, M / f"{split_model}.gguf", 1, 64, extra=["--split-mode", mode])
            res["check"] = f"split-mode-{mode}-fa1"
            if res.get("teacher_forced") and res.get("executed") == 0:  # handed back: stock's own tokens
                res["handed_back"] = True
                res["passed"] = res["teacher_forced"]["max_abs"] == 0 and res["free_greedy_identical_steps"] == 64
            result["correctness"].append(res)
            log(f"split {mode}: " + json.dumps({k: res.get(k) for k in ("passed", "teacher_forced", "reasons", "error")}))
            save()

    # Which matrices carry the quantized models' distance from stock CUDA: the 1B shape with one group of matrices
    # in a quantized type and every other matrix in BF16, each compared as in the correct stage and against stock
    # CPU. The all-BF16 model agrees with stock to 1e-7 (256 of 256 greedy tokens; not F16: ggml-cuda's F16 matvec
    # accumulates in half precision, mmvf.cu), so what a group's model loses is that group's doing. (llama-quantize
    # applies --tensor-type only when the target type is quantized: the target is the group's type, and the other
    # groups are overridden to BF16.)
    base_1b = M / "llama-llama-3.2-1b-F16.gguf"
    if "bisect" in a.stages and base_1b.is_file():
        groups = {"qkv": ["attn_q", "attn_k", "attn_v"], "o": ["attn_output"], "gateup": ["ffn_gate", "ffn_up"],
                  "down": ["ffn_down"], "head": []}
        steps = int(os.environ.get("MK_BISECT_STEPS", "64"))
        for q in os.environ.get("MK_BISECT_TYPES", "Q4_0").split():
            for g, names in groups.items():
                if g not in os.environ.get("MK_BISECT_GROUPS", " ".join(groups)).split():
                    continue
                f = M / f"bisect-1b-bf16-{q}-{g}.gguf"
                head = q.lower() if g == "head" else "bf16"
                over = ["--output-tensor-type", head, "--token-embedding-type", head]
                over += [x for h, ns in groups.items() if h != g for n in ns for x in ("--tensor-type", f"{n}=bf16")]
                if not f.is_file():
                    r = sh([str(bindir / "llama-quantize"), *over, str(base_1b), str(f), q])
                    if r.returncode != 0:
                        log(f"bisect {q} {g}: quantize failed {r.stderr[-500:]}")
                        continue
                    log(f"bisect {q} {g}: {f.stat().st_size >> 20} MiB")
                res = compare(tool, f, 0, steps, ref_cpu=steps)
                res["check"] = f"bisect-{q}-{g}-fa0"
                res["quantized"] = names or ["output", "token_embd"]
                res["file_mib"] = f.stat().st_size >> 20
                result.setdefault("bisect", []).append(res)
                log(f"bisect {q} {g}: " + json.dumps({k: res.get(k) for k in (
                    "teacher_forced", "free_greedy_identical_steps", "stock_cuda_vs_stock_cpu",
                    "megakernel_vs_stock_cpu", "stock_cpu_free_greedy_identical_steps", "file_mib", "error")}))
                save()

    for name in os.environ.get("MK_DEPTH_MODELS", "llama-llama-3.2-1b-Q4_0 llama-llama-3.2-1b-BF16").split():
        if "depth" not in a.stages or not have(name):
            continue
        for fa in (0, 1):
            res = compare(tool, M / f"{name}.gguf", fa, 256, prompt=3968, timeout=560, ref_cpu=ref_cpu(name, 256))
            res["check"] = f"depth-3968-to-4224-fa{fa}"
            result["correctness"].append(res)
            log(f"depth fa={fa}: " + json.dumps({k: res.get(k) for k in ("passed", "teacher_forced", "executed", "error")}))
            save()

    if "profile" in a.stages:  # where a step's time goes, per instruction (LLAMA_MEGAKERNEL_PROFILE)
        # "ring0": the same with the weight ring off, to see what the ring changes
        variants = [("", {})] + [(f"-ring{n}", {"LLAMA_MEGAKERNEL_RING": n})
                                 for n in os.environ.get("MK_PROFILE_RINGS", "").split()]
        variants += [("-noprefetch", {"LLAMA_MEGAKERNEL_PREFETCH": "0"})] if os.environ.get("MK_PROFILE_NOPREFETCH") else []
        variants += [(f"-prefetch{k}", {"LLAMA_MEGAKERNEL_PREFETCH": k})  # KiB per segment
                     for k in os.environ.get("MK_PROFILE_PREFETCH", "").split()]
        variants += [(f"-{n}", e) for n, e in bench_variants()]  # the bench's other arms, profiled too
        variants += [(f"-{n}", e) for n, e in env_arms("MK_PROFILE_VARIANTS")]
        # (label, model, extra arguments): each model at 256 cells; with MK_PROFILE_DEPTH=N also the 1B Q4_0
        # model's decode after an N-token prompt (attention over long contexts)
        runs = [(name, name, []) for name in ["llama-smollm2-135m-Q4_0", "llama-llama-3.2-1b-Q4_0",
                                              "llama-llama-3.2-1b-BF16", *os.environ.get("MK_EXTRA_BENCH", "").split()]]
        depth = int(os.environ.get("MK_PROFILE_DEPTH", "0") or 0)
        if depth:
            runs.append((f"llama-llama-3.2-1b-Q4_0-d{depth}", "llama-llama-3.2-1b-Q4_0",
                         ["--prompt", str(depth), "--ctx", str(depth + 320)]))
        for label, name, args in runs:
            for variant, extra in variants:
                if not have(name):
                    continue
                pf = out.parent / f"profile-{label}{variant}.json"
                cmd = [str(tool), str(M / f"{name}.gguf"), "--steps", "64", *args]
                r = sh(cmd, env=env_for(True, extra={"LLAMA_MEGAKERNEL_PROFILE": str(pf), **extra}), timeout=560)
                if pf.is_file():
                    prof = json.loads(pf.read_text())
                    result.setdefault("profiles", {})[label + variant] = {"step_us": prof["step_us"], "file": pf.name}
                    log(f"profile {label}{variant}: step {prof['step_us']} us")
                else:
                    log(f"profile {label}{variant}: no profile written (rc {r.returncode}) {r.stderr[-500:]}")
        save()

    if "ncu" in a.stages:  # Nsight Compute on one megakernel launch: where the time goes inside it
        for name in os.environ.get("MK_NCU_MODELS", "llama-llama-3.2-1b-Q4_0").split():
            if not have(name):
                continue
            rep = out.parent / f"ncu-{name}.txt"
            cmd = ["ncu", "-k", "regex:megakernel", "--launch-skip", "8", "--launch-count", "1",
                   "--section", "SpeedOfLight", "--section", "MemoryWorkloadAnalysis", "--section", "WarpStateStats",
                   "--section", "SchedulerStats", "--section", "LaunchStats", "--section", "Occupancy",
                   "--section", "InstructionStats", "--metrics", ",".join(
                       f"smsp__average_warps_issue_stalled_{k}_per_issue_active.ratio" for k in (
                           "barrier", "no_instruction", "long_scoreboard", "short_scoreboard", "wait", "lg_throttle",
                           "mio_throttle", "membar", "sleeping", "branch_resolving", "math_pipe_throttle",
                           "imc_miss", "drain", "dispatch_stall", "not_selected", "selected", "misc", "tex_throttle")),
                   str(tool), str(M / f"{name}.gguf"), "--steps", "16"]
            extra = {"LLAMA_MEGAKERNEL_RING": os.environ["MK_NCU_RING"]} if os.environ.get("MK_NCU_RING") else {}
            r = sh(cmd, env=env_for(True, extra=extra), timeout=400)
            rep.write_text(r.stdout[-200000:] + "\n" + r.stderr[-20000:])
            log(f"ncu {name}: rc {r.returncode}, {len(r.stdout)} chars")
            if os.environ.get("MK_NCU_SOURCE"):  # stall samples per source line (build with MK_CUDA_FLAGS=-lineinfo)
                rep_file = tmp / "src.ncu-rep"
                r = sh(["ncu", "--set", "none", "--section", "SourceCounters", "--section", "WarpStateStats",
                        "-k", "regex:megakernel",
                        "--launch-skip", "8", "--launch-count", "1", "-f", "-o", str(rep_file.with_suffix("")),
                        str(tool), str(M / f"{name}.gguf"), "--steps", "16"], env=env_for(True, extra=extra), timeout=400)
                for view in ("sass", "cuda") if os.environ["MK_NCU_SOURCE"] == "cuda" else ("sass",):
                    v = sh(["ncu", "--import", str(rep_file), "--page", "source", "--csv", "--print-source", view])
                    # whole: a tail cut loses the header row with the column names (it did at 3353c1a)
                    (out.parent / f"ncu-source-{view}-{name}.csv").write_text(v.stdout + v.stderr[-5000:])
                # only the SASS view carries the samples (the CUDA view is the source text)
                s = sh(["python3", str(Path(__file__).parent / "ncu_sass_top.py"), str(out.parent / f"ncu-source-sass-{name}.csv")])
                (out.parent / f"ncu-sass-top-{name}.txt").write_text(s.stdout + s.stderr)
                sh(["xz", "-T8", "-f", str(out.parent / f"ncu-source-sass-{name}.csv")])  # tens of MB, a few packed
                log(f"ncu source {name}: rc {r.returncode}")

    for name in os.environ.get("MK_SANITIZE_MODELS", "llama-tiny-Q4_0").split():
        if "sanitize" not in a.stages or not have(name):
            continue
        for which, env, suffix in (("memcheck", None, ""), ("racecheck", None, ""),
                                   ("memcheck", LONG_SPLITS, "-long-splits"), ("racecheck", LONG_SPLITS, "-long-splits")):
            res = sanitize(tool, M / f"{name}.gguf", which, env, suffix)
            result["correctness"].append(res)
            log(f"sanitize {which}{suffix}: " + json.dumps({k: res.get(k) for k in ("passed", "errors", "megakernel_ran", "rc")}))
            save()

    if "bench" in a.stages:
        bw = copy_bandwidth()
        result["copy_bandwidth_gbs"] = bw
        log(f"copy bandwidth {bw} GB/s")
        # bytes per token of the depth-0 program (n_kv 256), from the short comparisons, not the depth runs
        bytes_of = {c["model"]: c.get("bytes_per_token") for c in result["correctness"]
                    if c.get("bytes_per_token") and c.get("check", "").startswith("vs-stock")}
        rows = [("llama-smollm2-135m-Q4_0", "tg128", 0, ["-p", "0", "-n", "128", "-r", "5"]),
                ("llama-llama-3.2-1b-Q4_0", "tg128", 0, ["-p", "0", "-n", "128", "-r", "5"]),
                ("llama-llama-3.2-1b-Q4_K_M", "tg128", 0, ["-p", "0", "-n", "128", "-r", "5"]),
                ("llama-llama-3.2-1b-BF16", "tg128", 0, ["-p", "0", "-n", "128", "-r", "5"]),
                ("llama-llama-3.2-1b-Q4_0", "tg128", 4096, ["-p", "0", "-n", "128", "-r", "5", "-d", "4096"]),
                ("llama-llama-3.2-1b-Q4_0", "pp512", 0, ["-p", "512", "-n", "0", "-r", "5"])]
        rows += [(n, "tg128", 0, ["-p", "0", "-n", "128", "-r", "5"]) for n in os.environ.get("MK_EXTRA_BENCH", "").split()]
        only = re.compile(os.environ.get("MK_BENCH_ONLY", ""))  # e.g. "tg128-0$": the rows whose name-test-depth match
        for name, test, depth, args in rows:
            if not have(name) or not only.search(f"{name}-{test}-{depth}"):
                continue
            try:
                row = bench(bindir, M / f"{name}.gguf", test, args, a.rounds, tmp)
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                row = {"model": name, "test": test, "error": str(e)[-1500:]}
            row["depth"] = depth
            b = bytes_of.get(name)
            if b and test.startswith("tg") and "mk_tok_s" in row and bw:
                # KV rows read at this depth are not in the depth-0 program's count: add them (F16 K and V)
                cfg = {"llama-smollm2-135m": (30, 3, 64), "llama-llama-3.2-1b": (16, 8, 64)}
                for k, (nl, kvh, hd) in cfg.items():
                    if name.startswith(k):
                        b += depth * nl * kvh * hd * 2 * 2
                row["bytes_per_token"] = b
                floor_tok_s = bw * 1e9 / b  # bytes moved per second by a copy (read + write), as megakernel.md
                row["stock_pct_floor"] = round(100 * row["stock_tok_s"] / floor_tok_s, 1)
                row["mk_pct_floor"] = round(100 * row["mk_tok_s"] / floor_tok_s, 1)
            result["rows"].append(row)
            result["commands"].append(row.get("command", ""))
            log(f"bench {name} {test} d{depth}: " + json.dumps({k: row.get(k) for k in (
                "stock_tok_s", "mk_tok_s", "ratio", "mk_pct_floor", "plugin", "error")}
                | {k: v for k, v in row.items() if k.startswith("mk_") and k.endswith(("_tok_s", "_ratio"))}))
            save()

    save()
    print(f"\n{'model':28s} {'test':6s} {'depth':>5s} {'stock':>9s} {'mk':>9s} {'ratio':>6s}")
    for r in result["rows"]:
        if "ratio" in r:
            print(f"{r['model']:28s} {r['test']:6s} {r['depth']:5d} {r['stock_tok_s']:9.1f} {r['mk_tok_s']:9.1f} {r['ratio']:6.3f}")
    for c in result["correctness"]:
        print(f"{c['model']:28s} {c.get('check', '')}: {'PASS' if c.get('passed') else 'FAIL'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
