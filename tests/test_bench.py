"""`llama-megakernel bench` against a fake llama-bench (tests/data/fake-llama-bench: the pinned llama-bench's JSON
lines, tok/s chosen by the test) and a fake nvidia-smi: interleaving, statistics, the floor, the outputs and every
failure path. The energy arithmetic runs against a scripted NVML counter."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_model

FAKE = Path(__file__).parent / "data" / "fake-llama-bench"


@pytest.fixture()
def gpu_path(tmp_path):
    """A PATH whose nvidia-smi lists one GPU (the harness refuses to start without one)."""
    b = tmp_path / "bin"
    b.mkdir()
    smi = b / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-fake)'\n")
    smi.chmod(0o755)
    return f"{b}:{os.environ['PATH']}"


def run_bench(tmp_path, path_env, args, **env):
    e = dict(os.environ, PATH=path_env, FAKE_BENCH_LOG=str(tmp_path / "calls.jsonl"))
    e.update(env)
    return subprocess.run([sys.executable, "-m", "llama_megakernel", "bench", *args], capture_output=True, text=True,
                          env=e, timeout=300)


def calls(tmp_path):
    return [json.loads(x) for x in (tmp_path / "calls.jsonl").read_text().splitlines()]


def test_interleaved_medians_floor_and_outputs(tmp_path, gpu_path):
    model = tiny_model("llama", "Q4_0")
    stock, mk = [900.0, 870.0, 930.0, 910.0], [1700.0, 1850.0, 1790.0]
    out = tmp_path / "res"
    r = run_bench(tmp_path, gpu_path, [str(model), "--llama-bench", str(FAKE), "--rounds", "3", "-r", "1",
                                       "-n", "64", "-p", "256", "-d", "0,512", "--bandwidth", "3000",
                                       "--no-energy", "--out", str(out), "--", "-ub", "256"],
                  FAKE_BENCH_STOCK=",".join(map(str, stock)), FAKE_BENCH_MK=",".join(map(str, mk)))
    assert r.returncode == 0, r.stderr
    log = calls(tmp_path)
    # 4 tests (tg64, pp256 at depths 0 and 512) x 3 rounds x 2 sides; order A B, B A, A B within each test
    assert len(log) == 24
    for t in range(4):
        assert [c["side"] for c in log[6 * t:6 * t + 6]] == ["stock", "mk", "mk", "stock", "stock", "mk"]
    assert all(c["argv"][-2:] == ["-ub", "256"] for c in log)          # the user's flags, passed through
    assert all(c["gpu"] == "1" for c in log if c["side"] == "mk")         # the GPU executor is on for the plugin side
    assert all(c["gpu"] is None for c in log if c["side"] == "stock")
    assert [c["argv"][c["argv"].index("-d") + 1] for c in log if "-d" in c["argv"]] == ["512"] * 12

    res = json.loads(out.with_suffix(".json").read_text())
    assert [(x["test"], x["depth"]) for x in res["rows"]] == [("tg64", 0), ("pp256", 0), ("tg64", 512), ("pp256", 512)]
    for t, row in enumerate(res["rows"]):
        # the value the fake gave on call k (1-based) is base[k % len(base)]: the medians follow from the call log
        want = {"stock": [], "mk": []}
        for k, c in enumerate(log[6 * t:6 * t + 6], start=6 * t + 1):
            base = stock if c["side"] == "stock" else mk
            want[c["side"]].append(base[k % len(base)])
        assert [x["avg_ts"] for x in row["runs"]["stock"]] == pytest.approx(want["stock"])
        assert [x["avg_ts"] for x in row["runs"]["mk"]] == pytest.approx(want["mk"])
        assert row["stock_tok_s"] == pytest.approx(statistics.median(want["stock"]), abs=0.01)
        assert row["mk_tok_s"] == pytest.approx(statistics.median(want["mk"]), abs=0.01)
        assert row["ratio"] == pytest.approx(statistics.median(want["mk"]) / statistics.median(want["stock"]), abs=1e-4)
        assert row["plugin"]["gpu_steps"] > 0

    # % of the floor for the generation tests: bytes from the tensors' own arrays and the model's KV shape
    import gguf

    rd = gguf.GGUFReader(str(model))
    sizes = {t.name: t.data.nbytes for t in rd.tensors}
    weights = sum(v for k, v in sizes.items() if k != "token_embd.weight")
    if "output.weight" not in sizes:
        weights += sizes["token_embd.weight"]
    n_layer = int(rd.fields["llama.block_count"].parts[-1][0])
    n_embd = int(rd.fields["llama.embedding_length"].parts[-1][0])
    n_head = int(rd.fields["llama.attention.head_count"].parts[-1][0])
    n_kv = int(rd.fields["llama.attention.head_count_kv"].parts[-1][0])
    for row in res["rows"]:
        if row["test"] == "tg64":
            cells = row["depth"] + 32
            want_bytes = weights + cells * n_layer * n_kv * (n_embd // n_head) * 2 * 2
            assert row["bytes_per_token"] == want_bytes
            assert row["mk_pct_floor"] == pytest.approx(100 * row["mk_tok_s"] * want_bytes / 3000e9, abs=0.06)
        else:
            assert "mk_pct_floor" not in row

    assert [c["passed"] for c in res["correctness"]] == [True] * 4  # the fake plugin ran every step
    md = out.with_suffix(".md").read_text()
    assert f"| {model.stem} | tg64 | 512 |" in md and f"{res['rows'][0]['ratio']:.3f}" in md
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "[4/4]" in r.stdout and "round 3/3" in r.stdout  # progress while it runs


@pytest.mark.parametrize("fail", ["mk", "stock"])
def test_a_failing_run_gives_no_ratio(tmp_path, gpu_path, fail):
    model = tiny_model("llama", "Q4_0")
    out = tmp_path / "res"
    r = run_bench(tmp_path, gpu_path, [str(model), "--llama-bench", str(FAKE), "--rounds", "2", "-r", "1",
                                       "--bandwidth", "3000", "--no-energy", "--out", str(out)],
                  FAKE_BENCH_STOCK="900", FAKE_BENCH_MK="1800", FAKE_BENCH_FAIL=fail)
    assert r.returncode == 1
    assert "no CUDA-capable device" in r.stderr
    row = json.loads(out.with_suffix(".json").read_text())["rows"][0]
    assert "error" in row and "ratio" not in row and "mk_tok_s" not in row
    assert json.loads(out.with_suffix(".json").read_text())["correctness"][0]["passed"] is False
    assert "error:" in out.with_suffix(".md").read_text()


def test_plugin_that_did_not_load_gives_no_ratio(tmp_path, gpu_path):
    model = tiny_model("llama", "Q4_0")
    out = tmp_path / "res"
    r = run_bench(tmp_path, gpu_path, [str(model), "--llama-bench", str(FAKE), "--rounds", "1", "-r", "1",
                                       "--bandwidth", "3000", "--no-energy", "--out", str(out)],
                  FAKE_BENCH_STOCK="900", FAKE_BENCH_MK="1800", FAKE_BENCH_NO_PLUGIN="1")
    assert r.returncode == 1
    assert "plugin did not load" in r.stderr
    assert "ratio" not in json.loads(out.with_suffix(".json").read_text())["rows"][0]


@pytest.mark.parametrize("choice,passed", [("executor", True), ("stock", True), ("measuring", False)])
def test_auto_mode_side_reports_its_choice(tmp_path, gpu_path, choice, passed):
    """--gpu-executor auto: the plugin side runs with LLAMA_MEGAKERNEL_GPU=auto, and the check reads the plugin's
    choice (a model still measuring after the test did not get one)."""
    model = tiny_model("llama", "Q4_0")
    out = tmp_path / "res"
    r = run_bench(tmp_path, gpu_path, [str(model), "--llama-bench", str(FAKE), "--rounds", "1", "-r", "1",
                                       "--gpu-executor", "auto", "--bandwidth", "3000", "--no-energy",
                                       "--out", str(out)],
                  FAKE_BENCH_STOCK="900", FAKE_BENCH_MK="1800", FAKE_BENCH_AUTO_CHOICE=choice)
    assert r.returncode == 0, r.stderr
    assert [c["gpu"] for c in calls(tmp_path) if c["side"] == "mk"] == ["auto"]
    res = json.loads(out.with_suffix(".json").read_text())
    (chk,) = res["correctness"]
    assert chk["check"] == "auto-chose-a-path" and chk["passed"] is passed, chk
    assert chk["auto_choices"] == [{"choice": choice, "executor_us": 800.0, "stock_us": 1000.0}]
    assert res["rows"][0]["plugin"]["gpu_mode"] == "auto"


def test_refuses_without_gpu_or_llama_bench(tmp_path, gpu_path):
    model = tiny_model("llama", "Q4_0")
    empty = tmp_path / "empty"
    empty.mkdir()
    r = run_bench(tmp_path, f"{empty}:{Path(sys.executable).parent}", [str(model), "--llama-bench", str(FAKE)])
    assert r.returncode == 1 and "NVIDIA GPU" in r.stderr and "nvidia-smi" in r.stderr
    r = run_bench(tmp_path, gpu_path, [str(model), "--llama-bench", str(tmp_path / "nowhere"), "--no-energy"])
    assert r.returncode == 1 and "no llama-bench in" in r.stderr
    r = run_bench(tmp_path, gpu_path, [str(tmp_path / "missing.gguf"), "--llama-bench", str(FAKE)])
    assert r.returncode == 1 and "no model file" in r.stderr
    assert not (tmp_path / "calls.jsonl").exists()  # nothing ran


class ScriptedNvml:
    """pynvml stand-in: the energy counter (mJ) advances by the next scripted amount at each start/stop pair."""

    class NVMLError(Exception):
        pass

    NVML_CLOCK_SM, NVML_CLOCK_MEM = 1, 2

    def __init__(self, deltas_j):
        self.deltas = list(deltas_j)
        self.total = 10_000_000
        self.reads = 0

    def nvmlInit(self):
        pass

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetTotalEnergyConsumption(self, h):
        self.reads += 1
        if self.reads > 1 and self.reads % 2 == 1:  # a stop read (reads 3, 5, ...; read 1 is the probe)
            self.total += int(self.deltas.pop(0) * 1000)
        return self.total

    def nvmlDeviceGetName(self, h):
        return "Scripted GPU"

    def nvmlSystemGetDriverVersion(self):
        return "0"

    def nvmlDeviceGetPowerManagementLimit(self, h):
        return 700_000

    def nvmlDeviceGetClockInfo(self, h, k):
        return 1980

    def nvmlDeviceGetMaxClockInfo(self, h, k):
        return 1980


def test_energy_per_token_subtracts_the_load(tmp_path, monkeypatch):
    from llama_megakernel import bench

    # base runs (load + warm-up + 1 rep): stock 10 J, mk 8 J; then rounds stock 50, mk 30, mk 31, stock 52
    fake = ScriptedNvml([10, 8, 50, 30, 31, 52])
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setenv("FAKE_BENCH_LOG", str(tmp_path / "calls.jsonl"))
    monkeypatch.setenv("FAKE_BENCH_STOCK", "900")
    monkeypatch.setenv("FAKE_BENCH_MK", "1800")
    energy = bench.Energy(0)
    assert energy.info()["power_limit_w"] == 700 and energy.method == "nvml-total-energy-counter"
    case = bench.Case(tiny_model("llama", "Q4_0"), "tg128", 0, 128, 0, "")
    row = bench.bench_case(case, FAKE, Path("/nonexistent/plugin.so"), rounds=2, reps=5, energy=energy,
                           progress=lambda s: None)
    assert [c["argv"][c["argv"].index("-r") + 1] for c in calls(tmp_path)] == ["1", "1", "5", "5", "5", "5"]
    # 4 timed repetitions of 128 tokens beyond the base run
    assert row["stock_tok_per_j"] == pytest.approx(statistics.median([512 / 40, 512 / 42]), abs=1e-3)
    assert row["mk_tok_per_j"] == pytest.approx(statistics.median([512 / 22, 512 / 23]), abs=1e-3)
    assert row["ratio"] == pytest.approx(2.0)
    assert row["mk_j_per_tok"] == pytest.approx(1 / row["mk_tok_per_j"], rel=1e-3)
    assert row["llama_cpp_build_commit"] == "0c1e5709"  # from llama-bench's own JSON line
    assert np.isclose(row["runs"]["stock"][0]["joules"], 50.0)


def test_no_energy_figure_when_the_timed_work_is_lost_in_the_load(tmp_path, monkeypatch):
    from llama_megakernel import bench

    # load-only runs of 100 J against timed runs that add 10 J: too small a difference to subtract reliably
    monkeypatch.setitem(sys.modules, "pynvml", ScriptedNvml([100, 100, 110, 111, 112, 109]))
    monkeypatch.setenv("FAKE_BENCH_LOG", str(tmp_path / "calls.jsonl"))
    monkeypatch.setenv("FAKE_BENCH_STOCK", "30000")
    monkeypatch.setenv("FAKE_BENCH_MK", "30000")
    case = bench.Case(tiny_model("llama", "Q4_0"), "pp512", 512, 0, 0, "")
    row = bench.bench_case(case, FAKE, Path("/nonexistent/plugin.so"), rounds=2, reps=5, energy=bench.Energy(0),
                           progress=lambda s: None)
    assert "stock_tok_per_j" not in row and "mk_tok_per_j" not in row and row["ratio"] == pytest.approx(1.0)


def test_python_mode_runs_both_sides_through_llama_cpp_python(tmp_path, gpu_path):
    """--python on this machine's CPU: the plugin side must really load (its status file counts decode graphs)."""
    model = tiny_model("llama", "Q4_0")
    out = tmp_path / "res"
    r = run_bench(tmp_path, gpu_path, [str(model), "--python", "-n", "16", "--rounds", "1", "--bandwidth", "3000",
                                       "--no-energy", "--out", str(out)])
    assert r.returncode == 0, r.stderr[-3000:]
    row = json.loads(out.with_suffix(".json").read_text())["rows"][0]
    assert row["stock_tok_s"] > 0 and row["mk_tok_s"] > 0
    assert row["ratio"] == pytest.approx(row["mk_tok_s"] / row["stock_tok_s"], rel=1e-3)
    assert sum(row["plugin"]["reasons"].values()) >= 16  # every decode graph went through the plugin
