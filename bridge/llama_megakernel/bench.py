"""`llama-megakernel bench`: stock llama.cpp against the megakernel, side by side.

Each test runs the user's llama-bench twice per round, stock and with the plugin loaded through GGML_BACKEND_PATH,
in the order A B, B A, ... (same binary, same flags), and reports medians and their ratio. Around every run the GPU's
energy counter is read (NVML), so each side also gets tokens per joule; the bytes a token must read (from the GGUF
file) over the measured copy bandwidth give each side's share of the bandwidth floor. `--python` does the same
through llama-cpp-python's `Llama.generate`.

A ratio is only reported from runs that all succeeded, and only if the plugin's own status file shows it loaded.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path


class BenchError(RuntimeError):
    pass


def _say(msg: str) -> None:
    print(msg, flush=True)


# --- what to run -----------------------------------------------------------------------------------------------

@dataclass
class Case:
    model: Path
    test: str          # tg128, pp512
    n_prompt: int
    n_gen: int
    depth: int
    flash_attn: str    # "0", "1" or "" (llama-bench's default)
    extra: list[str] = field(default_factory=list)

    def args(self, reps: int) -> list[str]:
        a = ["-m", str(self.model), "-o", "jsonl", "-p", str(self.n_prompt), "-n", str(self.n_gen),
             "-r", str(reps)]
        if self.depth:
            a += ["-d", str(self.depth)]
        if self.flash_attn:
            a += ["-fa", self.flash_attn]
        return a + self.extra

    @property
    def tokens_per_rep(self) -> int:
        return self.n_gen if self.n_gen else self.n_prompt


def plan(models: list[Path], gens: list[int], prompts: list[int], depths: list[int], flash_attn: list[str],
         extra: list[str]) -> list[Case]:
    cases = []
    for m in models:
        for d in depths:
            for fa in flash_attn:
                cases += [Case(m, f"tg{n}", 0, n, d, fa, extra) for n in gens]
                cases += [Case(m, f"pp{p}", p, 0, d, fa, extra) for p in prompts]
    return cases


def find_llama_bench(given: str | None) -> Path:
    """An explicit path (the binary, or a llama.cpp tree or build directory), else $LLAMA_BENCH, else PATH."""
    cands: list[Path] = []
    if given:
        p = Path(given).expanduser()
        cands = [p, p / "llama-bench", p / "bin" / "llama-bench", p / "build" / "bin" / "llama-bench"]
    elif os.environ.get("LLAMA_BENCH"):
        cands = [Path(os.environ["LLAMA_BENCH"])]
    elif shutil.which("llama-bench"):
        cands = [Path(shutil.which("llama-bench"))]
    for c in cands:
        if c.is_file() and os.access(c, os.X_OK):
            return c.resolve()
    where = f"in {given}" if given else "on PATH or in $LLAMA_BENCH"
    raise BenchError(f"no llama-bench {where}. Build one with `llama-megakernel build-llama-cpp DIR --cuda "
                     "--target llama-bench` and pass --llama-bench DIR")


# --- energy ----------------------------------------------------------------------------------------------------

class Energy:
    """Joules used by GPU `index` between start() and stop(): NVML's total-energy counter, or power sampled every
    20 ms where the counter is missing. Never changes any GPU setting."""

    def __init__(self, index: int = 0):
        import pynvml  # nvidia-ml-py

        self.nv = pynvml
        try:
            pynvml.nvmlInit()
            self.h = pynvml.nvmlDeviceGetHandleByIndex(index)
        except pynvml.NVMLError as e:
            raise BenchError(f"NVML: {e} (no NVIDIA GPU or driver?)") from e
        try:
            pynvml.nvmlDeviceGetTotalEnergyConsumption(self.h)
            self.method = "nvml-total-energy-counter"
        except pynvml.NVMLError:
            self.method = "nvml-power-sampled-20ms"
        self._samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._e0 = 0

    def info(self) -> dict:
        nv, h = self.nv, self.h

        def get(fn, *a):
            try:
                v = fn(h, *a)
                return v.decode() if isinstance(v, bytes) else v
            except nv.NVMLError:
                return None

        limit = get(nv.nvmlDeviceGetPowerManagementLimit)
        try:
            cuda = nv.nvmlSystemGetCudaDriverVersion()
            cuda = f"{cuda // 1000}.{cuda % 1000 // 10}"
        except (nv.NVMLError, AttributeError):
            cuda = None
        return {"gpu": get(nv.nvmlDeviceGetName), "driver": nv.nvmlSystemGetDriverVersion(), "cuda_driver": cuda,
                "power_limit_w": limit / 1000 if limit else None,
                "sm_clock_mhz": get(nv.nvmlDeviceGetClockInfo, nv.NVML_CLOCK_SM),
                "sm_clock_max_mhz": get(nv.nvmlDeviceGetMaxClockInfo, nv.NVML_CLOCK_SM),
                "mem_clock_mhz": get(nv.nvmlDeviceGetClockInfo, nv.NVML_CLOCK_MEM),
                "energy_method": self.method}

    def start(self) -> None:
        if self.method.startswith("nvml-total"):
            self._e0 = self.nv.nvmlDeviceGetTotalEnergyConsumption(self.h)
            return
        self._samples = []
        self._stop.clear()

        def loop():
            while not self._stop.is_set():
                self._samples.append((time.perf_counter(), self.nv.nvmlDeviceGetPowerUsage(self.h) / 1000.0))
                self._stop.wait(0.02)

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()

    def stop(self) -> float:
        if self.method.startswith("nvml-total"):
            return (self.nv.nvmlDeviceGetTotalEnergyConsumption(self.h) - self._e0) / 1000.0  # mJ -> J
        self._stop.set()
        self._thread.join()
        s = self._samples
        return sum((t1 - t0) * (p0 + p1) / 2 for (t0, p0), (t1, p1) in zip(s, s[1:]))


# --- the bandwidth floor ---------------------------------------------------------------------------------------

def bytes_per_token(model: Path, kv_cells: int) -> int | None:
    """Bytes one decode step reads: every weight except the token embedding (one row of it; all of it when the LM
    head is tied to it), plus the K and V rows of `kv_cells` cells (F16 cache)."""
    try:
        import gguf
    except ImportError:
        return None
    r = gguf.GGUFReader(str(model))
    names = {t.name: int(t.n_bytes) for t in r.tensors}
    total = sum(n for k, n in names.items() if k != "token_embd.weight")
    if "output.weight" not in names:
        total += names.get("token_embd.weight", 0)
    arch = bytes(r.fields["general.architecture"].parts[-1]).decode()

    def num(key):
        f = r.fields.get(f"{arch}.{key}")
        return int(f.parts[-1][0]) if f is not None else None

    n_layer, n_head, n_embd = num("block_count"), num("attention.head_count"), num("embedding_length")
    n_head_kv = num("attention.head_count_kv") or n_head
    if n_layer and n_head and n_embd:
        hd_k = num("attention.key_length") or n_embd // n_head
        hd_v = num("attention.value_length") or n_embd // n_head
        total += kv_cells * n_layer * n_head_kv * (hd_k + hd_v) * 2
    return total


def measure_copy_bandwidth(lib_dirs: list[Path] = ()) -> tuple[float | None, str]:
    """The plugin's device-to-device copy rate (llama_mk_copy_bandwidth_gbs), in a child process so that its CUDA
    context goes away with it. The plugin needs a ggml beside it: `lib_dirs` (llama-bench's directory) are searched.
    Returns (GB/s, "") or (None, why)."""
    from ._native import MegakernelError, plugin_path

    code = ("import sys, cffi\n"
            "ffi = cffi.FFI(); ffi.cdef('double llama_mk_copy_bandwidth_gbs(int device);')\n"
            "print(ffi.dlopen(sys.argv[1]).llama_mk_copy_bandwidth_gbs(0))\n")
    import importlib.util

    dirs = [str(d) for d in lib_dirs]
    spec = importlib.util.find_spec("llama_cpp")  # llama-cpp-python's own ggml, without importing it here
    if spec and spec.submodule_search_locations:
        dirs.append(str(Path(list(spec.submodule_search_locations)[0]) / "lib"))
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(dirs + [env.get("LD_LIBRARY_PATH", "")])
    try:
        r = subprocess.run([sys.executable, "-c", code, str(plugin_path())], capture_output=True, text=True,
                           timeout=180, env=env)
        v = float(r.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.TimeoutExpired, MegakernelError) as e:
        return None, str(e)
    except (ValueError, IndexError):
        return None, (r.stderr.strip().splitlines() or ["no output"])[-1]
    return (round(v, 1), "") if v > 0 else (None, "the plugin has no CUDA executor or no GPU answered")


# --- running ---------------------------------------------------------------------------------------------------

def gpu_mode(gpu_executor: str) -> str:
    """LLAMA_MEGAKERNEL_GPU for the megakernel side: "1", "auto", or "0" (the plugin hands decode graphs back)."""
    if gpu_executor not in ("1", "auto", "0"):
        raise BenchError(f"GPU executor mode {gpu_executor!r}: expected 1, auto or 0")
    return gpu_executor


def _env(plugin: Path | None, status: Path | None, gpu_executor: str) -> dict:
    env = dict(os.environ)
    for k in ("GGML_BACKEND_PATH", "LLAMA_MEGAKERNEL_STATUS_FILE"):
        env.pop(k, None)
    if plugin is not None:
        env["GGML_BACKEND_PATH"] = str(plugin)
        env["LLAMA_MEGAKERNEL_STATUS_FILE"] = str(status)
        env["LLAMA_MEGAKERNEL_GPU"] = gpu_mode(gpu_executor)
    return env


def run_llama_bench(cmd: list[str], env: dict, energy: Energy | None, timeout: float) -> dict:
    if energy:
        energy.start()
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, errors="replace", env=env, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"timed out after {timeout:.0f} s: {' '.join(cmd)}") from e
    finally:
        joules = energy.stop() if energy else None
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise BenchError(f"exit status {r.returncode}: {' '.join(cmd)}\n{(r.stderr or r.stdout)[-1500:]}")
    lines = [json.loads(x) for x in r.stdout.splitlines() if x.strip().startswith("{")]
    if len(lines) != 1 or "samples_ts" not in lines[0]:
        raise BenchError(f"expected one JSON line with samples_ts from {' '.join(cmd)}, got: {r.stdout[-800:]}")
    return {"avg_ts": float(lines[0]["avg_ts"]), "samples_ts": [float(x) for x in lines[0]["samples_ts"]],
            "joules": joules, "wall_s": round(wall, 3), "result": lines[0]}


def _plugin_status(path: Path) -> dict:
    if not path.is_file():
        raise BenchError("the plugin did not load in the megakernel run (no status file was written): check "
                         "`llama-megakernel doctor` and that llama-bench is the patched build or accepts "
                         "GGML_BACKEND_PATH")
    st = json.loads(path.read_text())
    return {k: st.get(k) for k in ("routes", "reasons", "gpu_executor", "gpu_mode", "gpu_steps", "gpu_failures",
                                   "last_gpu_error", "auto_choices")}


def bench_case(case: Case, bench_bin: Path, plugin: Path, rounds: int, reps: int, energy: Energy | None,
               gpu_executor: str = "1", timeout: float = 900, progress=_say) -> dict:
    """One test, stock against megakernel. Raises BenchError if any run fails."""
    tmp = Path(tempfile.mkdtemp(prefix="mk-bench-"))
    status = tmp / "status.json"
    cmd = [str(bench_bin)] + case.args(reps)
    row: dict = {"model": case.model.stem, "test": case.test, "depth": case.depth, "flash_attn": case.flash_attn,
                 "reps": reps, "rounds": rounds, "command": " ".join(cmd),
                 "runs": {"stock": [], "mk": []}}
    base = {}
    last_build = None
    if energy and reps > 1:  # load + warm-up + one repetition, to take off each timed run's energy
        for side in ("stock", "mk"):
            b = run_llama_bench(cmd[:cmd.index("-r") + 1] + ["1"] + cmd[cmd.index("-r") + 2:],
                                _env(plugin if side == "mk" else None, status, gpu_executor), energy, timeout)
            base[side] = b["joules"]
    for i in range(rounds):
        for side in (("stock", "mk") if i % 2 == 0 else ("mk", "stock")):
            status.unlink(missing_ok=True)
            r = run_llama_bench(cmd, _env(plugin if side == "mk" else None, status, gpu_executor), energy, timeout)
            last_build = r["result"].get("build_commit")
            if side == "mk":
                row["plugin"] = _plugin_status(status)
            if side in base and r["joules"] is not None:
                r["gen_joules"] = r["joules"] - base[side]
            row["runs"][side].append({k: r[k] for k in ("avg_ts", "samples_ts", "joules", "wall_s")} |
                                     ({"gen_joules": r["gen_joules"]} if "gen_joules" in r else {}))
            progress(f"  round {i + 1}/{rounds} {side:5s} {r['avg_ts']:10.1f} tok/s"
                     + (f"  {r['joules']:8.1f} J" if r["joules"] is not None else ""))
    # tok/J only where the timed work used at least a quarter of what the load-only run did: below that the
    # subtraction is mostly the load's own run-to-run variation (prefill runs of a few ms are).
    _summarise(row, (reps - 1) * case.tokens_per_rep, {k: 0.25 * v for k, v in base.items()})
    row["llama_cpp_build_commit"] = last_build
    if base:
        row["base_joules"] = base
    shutil.rmtree(tmp, ignore_errors=True)
    return row


def _summarise(row: dict, timed_tokens: int, min_joules: dict) -> None:
    """Medians of each side's runs, tok/J from the runs whose timed energy exceeds min_joules[side], the ratio."""
    for side in ("stock", "mk"):
        runs = row["runs"][side]
        row[f"{side}_tok_s"] = round(statistics.median(x["avg_ts"] for x in runs), 2)
        per_j = [timed_tokens / x["gen_joules"] for x in runs
                 if x.get("gen_joules") and x["gen_joules"] > min_joules.get(side, 0)]
        if per_j:
            row[f"{side}_tok_per_j"] = round(statistics.median(per_j), 3)
            row[f"{side}_j_per_tok"] = round(1.0 / row[f"{side}_tok_per_j"], 5)
    row["ratio"] = round(row["mk_tok_s"] / row["stock_tok_s"], 4)


def add_floor(row: dict, case: Case, bandwidth_gbs: float | None) -> None:
    if not bandwidth_gbs or not case.n_gen:
        return
    b = bytes_per_token(case.model, case.depth + case.n_gen // 2)  # mean context over the test
    if not b:
        return
    floor_tok_s = bandwidth_gbs * 1e9 / b
    row["bytes_per_token"] = b
    row["stock_pct_floor"] = round(100 * row["stock_tok_s"] / floor_tok_s, 1)
    row["mk_pct_floor"] = round(100 * row["mk_tok_s"] / floor_tok_s, 1)


# --- --python: the same through llama-cpp-python ---------------------------------------------------------------

_PY_CHILD = r"""
import json, sys, time
import llama_cpp
model, n_gen, depth, fa = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
kw = {} if fa == "" else {"flash_attn": fa == "1"}
llm = llama_cpp.Llama(model_path=model, n_ctx=depth + n_gen + 64, n_gpu_layers=-1, verbose=False, seed=0, **kw)
prompt = [llm.token_bos()] + [1 + (i * 7919) % (llm.n_vocab() - 2) for i in range(depth)]
llm.eval(prompt)  # the context the test starts from
def gen(n):
    out, t0 = 0, time.perf_counter()
    for tok in llm.generate([], temp=0.0, reset=False):
        out += 1
        if out >= n:
            break
    return time.perf_counter() - t0
gen(8)  # warm-up
print(json.dumps({"ready": time.perf_counter()}), flush=True)
dt = gen(n_gen)
print(json.dumps({"tok_s": n_gen / dt, "seconds": dt}), flush=True)
"""


def run_python(case: Case, env: dict, energy: Energy | None, timeout: float) -> dict:
    p = subprocess.Popen([sys.executable, "-c", _PY_CHILD, str(case.model), str(case.n_gen), str(case.depth),
                          case.flash_attn], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        ready = p.stdout.readline()
        if not ready.startswith("{"):
            p.kill()
            raise BenchError(f"llama-cpp-python child failed: {(p.stderr.read() or ready)[-1500:]}")
        if energy:
            energy.start()  # only the timed generation: the load and warm-up are before "ready"
        out, err = p.communicate(timeout=timeout)
        joules = energy.stop() if energy else None
    except subprocess.TimeoutExpired as e:
        p.kill()
        raise BenchError(f"llama-cpp-python child timed out after {timeout:.0f} s") from e
    if p.returncode != 0 or not out.strip():
        raise BenchError(f"llama-cpp-python child failed ({p.returncode}): {err[-1500:]}")
    res = json.loads(out.strip().splitlines()[-1])
    return {"avg_ts": res["tok_s"], "samples_ts": [res["tok_s"]], "joules": joules, "gen_joules": joules,
            "wall_s": res["seconds"]}


def bench_case_python(case: Case, rounds: int, energy: Energy | None, gpu_executor: str = "1",
                      timeout: float = 900, progress=_say) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="mk-bench-"))
    status = tmp / "status.json"
    row: dict = {"model": case.model.stem, "test": case.test, "depth": case.depth, "flash_attn": case.flash_attn,
                 "reps": 1, "rounds": rounds, "command": f"llama-cpp-python Llama.generate, {case.n_gen} tokens",
                 "runs": {"stock": [], "mk": []}}
    for i in range(rounds):
        for side in (("stock", "mk") if i % 2 == 0 else ("mk", "stock")):
            status.unlink(missing_ok=True)
            env = _env(None, None, gpu_executor)
            env.pop("LLAMA_MEGAKERNEL", None)
            if side == "mk":  # the package's import hook enables the plugin in unchanged llama-cpp-python code
                env.update({"LLAMA_MEGAKERNEL": "1", "LLAMA_MEGAKERNEL_STATUS_FILE": str(status),
                            "LLAMA_MEGAKERNEL_GPU": gpu_mode(gpu_executor)})
            r = run_python(case, env, energy, timeout)
            if side == "mk":
                row["plugin"] = _plugin_status(status)
            row["runs"][side].append(r)
            progress(f"  round {i + 1}/{rounds} {side:5s} {r['avg_ts']:10.1f} tok/s")
    _summarise(row, case.n_gen, {})
    shutil.rmtree(tmp, ignore_errors=True)
    return row


# --- output ----------------------------------------------------------------------------------------------------

def markdown(result: dict) -> str:
    env = result.get("environment", {})
    o = [f"# llama-megakernel bench, {result['date']}", "",
         f"GPU {env.get('gpu', '?')}, driver {env.get('driver', '?')} (CUDA {env.get('cuda_driver', '?')}), power limit {env.get('power_limit_w', '?')} W, "
         f"SM clock {env.get('sm_clock_mhz', '?')} / {env.get('sm_clock_max_mhz', '?')} MHz (as found), "
         f"copy bandwidth {result.get('copy_bandwidth_gbs') or '-'} GB/s. Plugin commit {result.get('commit', '?')}, "
         f"{result['mode']}. Medians of {result['rounds']} rounds, stock and megakernel alternated A B / B A.", "",
         "| model | test | depth | fa | stock tok/s | megakernel tok/s | ratio | stock tok/J | mk tok/J | "
         "stock % floor | mk % floor |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if "error" in r:
            o.append(f"| {r['model']} | {r['test']} | {r['depth']} | {r.get('flash_attn') or '-'} | "
                     f"error: {r['error'].splitlines()[0][:100]} | | | | | | |")
            continue
        o.append(f"| {r['model']} | {r['test']} | {r['depth']} | {r.get('flash_attn') or '-'} | {r['stock_tok_s']:.1f} | "
                 f"{r['mk_tok_s']:.1f} | {r['ratio']:.3f} | {r.get('stock_tok_per_j', '-')} | "
                 f"{r.get('mk_tok_per_j', '-')} | {r.get('stock_pct_floor', '-')} | {r.get('mk_pct_floor', '-')} |")
    checks = result.get("correctness", [])
    if checks:
        bad = [f"{c['model']} {c['test']} d{c['depth']}" for c in checks if not c["passed"]]
        o += ["", f"Plugin counters: {len(checks) - len(bad)} of {len(checks)} tests passed their check "
                  "(generation steps ran in the GPU executor, no executor failure)"
                  + (f"; failed: {', '.join(bad)}" if bad else "") + "."]
    return "\n".join(o) + "\n"


def plot(result: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in result["rows"] if "ratio" in r]
    if not rows:
        return False
    labels = [f"{r['model']}\n{r['test']} d{r['depth']}" + (f" fa{r['flash_attn']}" if r.get("flash_attn") else "")
              for r in rows]
    x = range(len(rows))
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 2.2 * len(rows)), 4.5))
    for ax, key, title in ((axes[0], "tok_s", "tokens per second"), (axes[1], "tok_per_j", "tokens per joule")):
        s = [r.get(f"stock_{key}", 0) or 0 for r in rows]
        m = [r.get(f"mk_{key}", 0) or 0 for r in rows]
        ax.bar([i - 0.2 for i in x], s, 0.4, label="stock llama.cpp")
        ax.bar([i + 0.2 for i in x], m, 0.4, label="llama-megakernel")
        ax.set_xticks(list(x))
        ax.set_xticklabels(labels, fontsize=7)
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.suptitle(f"{result.get('environment', {}).get('gpu', '')} {result['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write(result: dict, out: Path) -> list[Path]:
    out.parent.mkdir(parents=True, exist_ok=True)
    js, md, png = out.with_suffix(".json"), out.with_suffix(".md"), out.with_suffix(".png")
    js.write_text(json.dumps(result, indent=1))
    md.write_text(markdown(result))
    files = [js, md]
    if plot(result, png):
        files.append(png)
    return files


def plugin_check(row: dict, case: Case, gpu_executor: str) -> dict:
    """What the plugin's own counters say about the megakernel side of a test: generation steps ran in the GPU
    executor without a failure (auto: and a path was chosen for every model; for prefill and with the executor off,
    nothing failed)."""
    st = row.get("plugin") or {}
    mode = gpu_mode(gpu_executor)
    gen = bool(case.n_gen) and mode != "0"
    check = ("auto-chose-a-path" if mode == "auto" else "decode-steps-in-the-gpu-executor") if gen else \
        "no-gpu-executor-failure"
    ok = "error" not in row and st.get("gpu_failures") == 0 and (not gen or (st.get("gpu_steps") or 0) > 0)
    choices = st.get("auto_choices") or []
    if gen and mode == "auto":
        ok = ok and bool(choices) and all(c.get("choice") in ("executor", "stock") for c in choices)
    out = {"model": row["model"], "test": row["test"], "depth": row["depth"], "check": check, "passed": ok,
           "gpu_steps": st.get("gpu_steps"), "gpu_failures": st.get("gpu_failures")}
    if mode == "auto":
        out["auto_choices"] = [{k: c.get(k) for k in ("choice", "executor_us", "stock_us")} for c in choices]
    return out


# --- the command -----------------------------------------------------------------------------------------------

def have_gpu() -> str | None:
    """None if an NVIDIA GPU answers, else why not."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return "no nvidia-smi on PATH (no NVIDIA driver)"
    try:
        r = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"nvidia-smi failed: {e}"
    if r.returncode != 0 or "GPU" not in r.stdout:
        return f"nvidia-smi lists no GPU: {(r.stderr or r.stdout).strip()[:300]}"
    return None


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()] if s else []


def main(args) -> int:
    from . import __version__
    from ._native import MegakernelError, plugin_path

    def err(msg: str) -> int:
        print(f"llama-megakernel bench: error: {msg}", file=sys.stderr, flush=True)
        return 1

    why = have_gpu()
    if why:
        return err(f"{why}; the comparison needs an NVIDIA GPU")
    models = [Path(m).expanduser() for m in args.models]
    for m in models:
        if not m.is_file():
            return err(f"no model file {m}")
    try:
        plugin = plugin_path()
        bench_bin = None if args.python else find_llama_bench(args.llama_bench)
    except (BenchError, MegakernelError) as e:
        return err(str(e))
    energy = None
    if not args.no_energy:
        try:
            energy = Energy(0)
        except (BenchError, ImportError) as e:
            _say(f"note: no energy readings ({e})")
    gens, prompts = _ints(args.gen), _ints(args.prompt)
    if args.python and prompts:
        return err("--python measures generation only; drop -p")
    cases = plan(models, gens, prompts, _ints(args.depth) or [0], args.flash_attn.split(",") if args.flash_attn else [""],
                 list(args.extra or []))
    if not cases:
        return err("nothing to run: give -n and/or -p")
    bw = args.bandwidth
    if bw is None:
        _say("measuring the copy bandwidth ...")
        bw, why = measure_copy_bandwidth([bench_bin.parent] if bench_bin else [])
        _say(f"  {bw} GB/s" if bw else f"  not measured ({why}); no % of floor (--bandwidth GBS gives one)")
    result = {"date": time.strftime("%Y-%m-%d"), "commit": os.environ.get("MK_COMMIT") or __version__,
              "llama_cpp_commit": "0c1e5709", "mode": "llama-cpp-python Llama.generate" if args.python else
              f"llama-bench {bench_bin}", "rounds": args.rounds, "copy_bandwidth_gbs": bw,
              "environment": energy.info() if energy else {}, "plugin": str(plugin),
              "gpu_executor": args.gpu_executor, "commands": [], "rows": [], "correctness": []}
    if "gpu" in result["environment"]:
        result["gpu"] = result["environment"]["gpu"]
        result["driver"] = result["environment"]["driver"]
    failed = 0
    for k, c in enumerate(cases, 1):
        _say(f"[{k}/{len(cases)}] {c.model.name} {c.test} depth {c.depth}" + (f" fa {c.flash_attn}" if c.flash_attn else ""))
        try:
            if args.python:
                row = bench_case_python(c, args.rounds, energy, args.gpu_executor, args.timeout)
            else:
                row = bench_case(c, bench_bin, plugin, args.rounds, args.reps, energy, args.gpu_executor, args.timeout)
            add_floor(row, c, bw)
            _say(f"  stock {row['stock_tok_s']:.1f}  megakernel {row['mk_tok_s']:.1f} tok/s  ratio {row['ratio']:.3f}")
        except BenchError as e:
            failed += 1
            row = {"model": c.model.stem, "test": c.test, "depth": c.depth, "flash_attn": c.flash_attn, "error": str(e)}
            print(f"  failed: {e}", file=sys.stderr, flush=True)
        result["rows"].append(row)
        result["correctness"].append(plugin_check(row, c, args.gpu_executor))
        if "command" in row:
            result["commands"].append(row["command"])
    builds = {r.get("llama_cpp_build_commit") for r in result["rows"]} - {None}
    if builds:
        result["llama_cpp_commit"] = ",".join(sorted(builds))  # as llama-bench reports its own build
    out = Path(args.out) if args.out else Path("bench-results") / f"{result['date']}-bench"
    files = write(result, out)
    print(markdown(result), flush=True)
    _say("wrote " + ", ".join(str(f) for f in files))
    return 1 if failed else 0
