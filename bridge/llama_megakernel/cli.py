"""`llama-megakernel` command line: doctor, path, demo, make-model."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path


def _say(msg: str) -> None:
    print(msg, flush=True)


def _err(msg: str) -> int:
    print(f"llama-megakernel: error: {msg}", file=sys.stderr, flush=True)
    return 1


def _gpu_lines() -> list[str]:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return ["no nvidia-smi on PATH (no NVIDIA driver, or a CPU-only machine)"]
    try:
        out = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total,power.limit,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return [f"nvidia-smi failed: {e}"]
    if out.returncode != 0:
        return [f"nvidia-smi failed: {(out.stderr or out.stdout).strip()}"]
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


def _summarise_status(st: dict) -> list[str]:
    lines = [
        f"graphs seen {st['graphs_seen']}, handled {st['graphs_handled']}, handed back {st['graphs_handed_back']} "
        f"(batch-1 decode graphs recognised: {st['decode_graphs_seen']})",
    ]
    for reason, n in sorted(st["reasons"].items(), key=lambda kv: -kv[1]):
        lines.append(f"  {'executed   ' if reason == 'executed' else 'handed back'} {n:5d} x  {reason}")
    for c in st.get("auto_choices") or []:  # LLAMA_MEGAKERNEL_GPU=auto / LLAMA_MEGAKERNEL_CPU=auto
        lines.append(f"  auto: {c['model']} -> {c['choice']}" + (f" ({c['why']})" if c.get("why") else ""))
    for g in st["last_graphs"]:
        s = g["scan"]
        types = ",".join(f"{k}:{v}" for k, v in s["weight_types"].items()) or "-"
        lines.append(f"  last: {g['backend']:6s} nodes={s['n_nodes']:4d} tokens={s['n_tokens']:3d} calls={g['calls']:4d} "
                     f"weights[{types}] -> {s['reason']}: {s['detail']}")
    return lines


def _generate(model_path: Path, prompt: str, n_tokens: int, stream: bool, n_ctx: int = 512, **kw):
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(model_path), n_ctx=n_ctx, n_gpu_layers=-1, verbose=False, seed=0, **kw)
    t0 = time.perf_counter()
    first = None
    pieces = []
    for out in llm.create_completion(prompt, max_tokens=n_tokens, temperature=0.0, stream=True):
        choice = out["choices"][0]
        if choice.get("finish_reason") is not None and not choice["text"]:
            break  # the closing chunk carries no token
        if first is None:
            first = time.perf_counter()
        pieces.append(choice["text"])
        if stream:
            print(choice["text"], end="", flush=True)
    t1 = time.perf_counter()
    if stream:
        print(flush=True)
    n = len(pieces)
    decode_s = (t1 - first) if first else 0.0
    return "".join(pieces), n, (n - 1) / decode_s if n > 1 and decode_s > 0 else float("nan"), t1 - t0


# --- commands ------------------------------------------------------------------------------------------------

def cmd_path(args) -> int:
    from ._native import MegakernelError, plugin_path

    try:
        print(plugin_path())
    except MegakernelError as e:
        return _err(str(e))
    return 0


def cmd_doctor(args) -> int:
    import platform

    import llama_megakernel as mk
    from . import models

    _say(f"llama-megakernel {mk.__version__}  (python {platform.python_version()}, {platform.machine()})")
    _say(f"pinned: llama.cpp {mk.LLAMA_CPP_COMMIT}, ggml {mk.GGML_VERSION}, "
         f"llama-cpp-python {mk.LLAMA_CPP_PYTHON_VERSION}")
    try:
        import llama_cpp

        _say(f"llama-cpp-python: {llama_cpp.__version__} at {Path(llama_cpp.__file__).parent}")
    except Exception as e:  # noqa: BLE001 - doctor reports whatever is wrong
        return _err(f"llama_cpp cannot be imported: {e}")
    for line in _gpu_lines():
        _say(f"GPU: {line}")
    try:
        info = mk.enable()
    except mk.MegakernelError as e:
        return _err(str(e))
    _say(f"plugin: {mk.plugin_path()}")
    _say(f"  built from {info['git_commit']} against llama.cpp {info['built_against_llama_cpp']} / ggml "
         f"{info['built_against_ggml']}; runtime ggml {info['ggml_runtime']}")
    if info["cuda_compiled"]:
        _say(f"  CUDA executor compiled for sm_{info['cuda_architectures']}; CUDA sees: {json.dumps(info['cuda_devices'])}")
    else:
        _say("  CPU-only build (no CUDA compiler at build time)")
    st = mk.status()
    routes = ", ".join(f"{reg}: {how}" for reg, how in st["routes"].items()) or "(none)"
    _say(f"routes: {routes}  (intercept = no-patch route; hook = patched llama.cpp)")
    _say(f"interception: {'active' if st['intercepted_devices'] else 'NOT active'} on devices "
         f"{', '.join(st['intercepted_devices']) or '(none)'}")
    gpu = {"on": "on", "auto": "auto (the faster of it and stock, measured per model)"}.get(
        st.get("gpu_mode"), "off (LLAMA_MEGAKERNEL_GPU=1 turns it on, =auto takes it where it measures faster)")
    cpu = {"on": "on", "auto": "auto"}.get(
        st.get("cpu_mode"), "off (LLAMA_MEGAKERNEL_CPU=1 turns it on; for tests and debugging)")
    _say(f"executors: GPU {gpu if info['cuda_compiled'] else 'not built'}; CPU {cpu}")
    sup = mk.supported()
    _say(f"architectures: {', '.join(sup['architectures'])}")
    _say(f"weight types: {', '.join(sup['weight_types'])}")
    _say(f"graph ops: {', '.join(sup['ops'])}; gated activations: {', '.join(sup['glu_ops'])}; "
         f"activations: {', '.join(sup.get('unary_ops', []))}")
    _say("anything else is handed back to stock llama.cpp with its reason")
    if args.no_run:
        return 0
    try:
        model = Path(args.model) if args.model else models.smollm2_path()
    except models.ModelFactoryError as e:
        _say(f"(skipping the test decode: {e})")
        return 0
    _say(f"test decode: 8 tokens of {model.name} ...")
    _generate(model, "The capital of France is", 8, stream=False)
    for line in _summarise_status(mk.status()):
        _say(line)
    return 0


def cmd_demo(args) -> int:
    import llama_megakernel as mk
    from . import models

    try:
        model = Path(args.model) if args.model else models.smollm2_path()
    except models.ModelFactoryError as e:
        return _err(str(e))
    if not model.is_file():
        return _err(f"model file {model} not found")
    try:
        mk.enable()
    except mk.MegakernelError as e:
        return _err(str(e))
    _say(f"model: {model}")
    _say(f"prompt: {args.prompt!r}\n")
    text, n, tps, wall = _generate(model, args.prompt, args.tokens, stream=True)
    _say(f"\n{n} tokens in {wall:.2f} s, decode {tps:.1f} tokens/s (plugin {'on' if mk.is_enabled() else 'off'})")
    for line in _summarise_status(mk.status()):
        _say(line)
    return 0


def cmd_make_model(args) -> int:
    from . import models

    t0 = time.perf_counter()
    try:
        out = models.make_model(args.arch, args.shape, args.quant, args.out, seed=args.seed, vocab=args.vocab,
                                head=args.head, progress=lambda m: _say(f"[make-model] {m}"))
    except (models.ModelFactoryError, OSError) as e:
        return _err(str(e))
    _say(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_bench(args) -> int:
    from . import bench

    return bench.main(args)


def cmd_patch(args) -> int:
    from . import patching

    fn = {"apply": lambda t: patching.apply(t, dry_run=args.dry_run),
          "revert": lambda t: patching.revert(t, dry_run=args.dry_run),
          "check": patching.check,
          "status": lambda t: patching.status(t).describe()}[args.action]
    try:
        _say(fn(args.dir))
    except patching.PatchError as e:
        return _err(str(e))
    return 0


def cmd_fetch_llama_cpp(args) -> int:
    from . import pinned

    dest = Path(args.dir)
    if dest.exists() and any(dest.iterdir()):
        return _err(f"{dest} exists and is not empty")
    try:
        if args.git:
            _say(f"cloning {args.git} at {pinned.LLAMA_CPP_COMMIT} into {dest}")
            subprocess.run(["git", "clone", "--quiet", "--no-checkout", args.git, str(dest)], check=True)
            subprocess.run(["git", "-C", str(dest), "checkout", "--quiet", pinned.LLAMA_CPP_COMMIT], check=True)
        else:
            src = pinned.ensure_tree()
            _say(f"copying the pinned llama.cpp {pinned.LLAMA_CPP_COMMIT} (from the llama-cpp-python "
                 f"{pinned.LLAMA_CPP_PYTHON_VERSION} sdist) into {dest}")
            shutil.copytree(src, dest, dirs_exist_ok=True)
        pinned.check_tree(dest)
    except (pinned.PinnedTreeError, subprocess.CalledProcessError, OSError) as e:
        return _err(str(e))
    _say(f"done: {dest}")
    return 0


def _run_streaming(cmd: list[str], env=None) -> int:
    _say("$ " + " ".join(cmd))
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as p:
        for line in p.stdout:
            print("  " + line.rstrip(), flush=True)
    return p.returncode


def cmd_build_llama_cpp(args) -> int:
    from . import patching

    tree = Path(args.dir).resolve()
    try:
        st = patching.status(tree)
    except patching.PatchError as e:
        return _err(str(e))
    if st.state != "patched":
        _say(f"note: the tree is {st.state}, not patched; the plugin will use interception "
             f"(`llama-megakernel patch apply {tree}` adds the hooks)")
    build = Path(args.build_dir).resolve() if args.build_dir else tree / "build"
    cfg = ["cmake", "-S", str(tree), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
           "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF"]
    if args.cuda:
        cfg += ["-DGGML_CUDA=ON", f"-DCMAKE_CUDA_ARCHITECTURES={args.cuda_arch}"]
    if shutil.which("ninja"):
        cfg += ["-G", "Ninja"]
    cfg += args.cmake_arg or []
    if _run_streaming(cfg) != 0:
        return _err("CMake configuration failed (output above)")
    bld = ["cmake", "--build", str(build), "-j", str(args.jobs)]
    for t in args.target or []:
        bld += ["--target", t]
    if _run_streaming(bld) != 0:
        return _err("the build failed (output above)")
    _say(f"built in {build}; run the tools with GGML_BACKEND_PATH=$(llama-megakernel path)")
    return 0


def _pyproject_dependencies(pyproject: Path) -> list[str]:
    """[project].dependencies of a pyproject.toml (tomllib is not in every Python this package supports)."""
    import re

    m = re.search(r"^dependencies\s*=\s*\[(.*?)\]", pyproject.read_text(), re.S | re.M)
    return re.findall(r'"([^"]+)"', m.group(1)) if m else []


def cmd_install_llama_cpp_python(args) -> int:
    import tarfile
    import tempfile

    from . import patching, pinned

    env = dict(os.environ)
    cmake_args = env.get("CMAKE_ARGS", "")
    if args.cuda and "GGML_CUDA" not in cmake_args:
        cmake_args += " -DGGML_CUDA=on"
    env["CMAKE_ARGS"] = cmake_args.strip()
    with tempfile.TemporaryDirectory(prefix="mk-llama-cpp-python-") as work:
        try:
            sdist = pinned.sdist_path()
            _say(f"unpacking {sdist.name} into {work}")
            with tarfile.open(sdist) as tf:
                tf.extractall(work)
            src = Path(work) / f"llama_cpp_python-{pinned.LLAMA_CPP_PYTHON_VERSION}"
            _say(patching.apply(src / "vendor" / "llama.cpp"))
            _say(patching.status(src / "vendor" / "llama.cpp").describe())
        except (pinned.PinnedTreeError, patching.PatchError, OSError, tarfile.TarError) as e:
            return _err(str(e))
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--force-reinstall", "-v", str(src)]
        _say(f"CMAKE_ARGS={env['CMAKE_ARGS']!r}")
        if args.dry_run:
            _say("dry run: would run " + " ".join(cmd) + ", then install its dependencies: "
                 + " ".join(_pyproject_dependencies(src / "pyproject.toml")))
            return 0
        if _run_streaming(cmd, env=env) != 0:
            return _err("pip failed to build the patched llama-cpp-python (output above)")
        # --no-deps keeps pip from reinstalling (and maybe upgrading) the user's packages; install only what is
        # missing, as listed by the sdist itself
        deps = _pyproject_dependencies(src / "pyproject.toml")
        if deps and _run_streaming([sys.executable, "-m", "pip", "install", *deps]) != 0:
            return _err("pip failed to install llama-cpp-python's dependencies: " + " ".join(deps))
    _say("installed the patched llama-cpp-python; `llama-megakernel doctor` shows the route in use")
    return 0


def cmd_explain(args) -> int:
    """Compile one decode graph of MODEL (a real decode step on the CPU, stock compute) and print the program."""
    import json

    if args.sms:
        os.environ["LLAMA_MEGAKERNEL_TARGET_SMS"] = str(args.sms)
    import llama_megakernel as mk

    mk.enable()
    import llama_cpp

    # with --json the program is the only thing on stdout, so that it can be piped
    print(f"[explain] loading {args.model} and running one decode step on the CPU", flush=True,
          file=sys.stderr if args.json else sys.stdout)
    llm = llama_cpp.Llama(model_path=args.model, n_ctx=args.ctx, n_gpu_layers=0, flash_attn=args.flash_attn,
                          verbose=False)
    toks = llm.tokenize(b"Hello")
    llm.eval(toks)
    llm.eval([toks[-1]])
    prog = mk.explain()
    if prog is None:
        last = mk.status().get("last_graphs") or [{}]
        scan = last[-1].get("scan", {})
        _say(f"no program: the decode graph was not compiled ({scan.get('reason')}: {scan.get('detail')})")
        return 1
    if args.json:
        print(json.dumps(prog, indent=1))
        return 0
    ins = prog["instructions"]
    layer0 = [i for i in ins if i["layer"] == 0]
    _say(f"program for {prog['n_sm']} multiprocessors: {len(ins)} instructions, {prog['n_layers']} layers, "
         f"scratch {prog['scratch_bytes'] / 1024:.0f} KiB")
    _say("layer 0:")
    _say(f"  {'#':>3} {'kind':<7} {'output':<18} {'input':<12} {'tiles':>5} {'KiB read':>9} {'depth':>5}  epilogue")
    for k, i in enumerate(ins):
        if i["layer"] != 0:
            continue
        epi = " | ".join(",".join(sg["epilogue"]) or "-" for sg in i["segments"]) if i["kind"] != "attn" else \
            f"{i['heads']} heads / {i['kv_heads']} KV heads, {i['n_kv']} cells in {i['n_split']} splits" + \
            (", merged in the last split" if i.get("merged_in_last_split") else "")
        _say(f"  {k:>3} {i['kind']:<7} {i['name'][:18]:<18} {i['input']:<12} {i['tiles']:>5} "
             f"{i['bytes'] / 1024:>9.1f} {i['depth']:>5}  {epi}")
    edges = prog["edges_per_layer"]
    total = prog["bytes_per_token"]
    bw = args.bandwidth * 1e12
    _say(f"instructions per layer: {len(layer0)}; serial edges per layer: "
         f"{min(edges) if edges else '-'}..{max(edges) if edges else '-'}; "
         f"critical path: {prog['critical_path_edges']} edges")
    _say(f"bytes per token: {total / 1e6:.2f} MB (weights, KV rows at {max((i.get('n_kv', 0) for i in ins), default=0)} "
         f"cells, vectors); floor at {args.bandwidth:.2f} TB/s: {total / bw * 1e6:.1f} us/token = "
         f"{bw / total:,.0f} tok/s")
    return 0


def main(argv: list[str] | None = None) -> int:
    from . import models

    p = argparse.ArgumentParser(prog="llama-megakernel",
                                description="llama.cpp decode as one persistent kernel launch per token")
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("doctor", help="versions, plugin, GPU, interception, and what a short decode did")
    d.add_argument("--model", help="GGUF for the test decode (default: the embedded SmolLM2-135M)")
    d.add_argument("--no-run", action="store_true", help="skip the test decode")
    d.set_defaults(fn=cmd_doctor)

    pa = sub.add_parser("path", help="print the plugin library's path (for GGML_BACKEND_PATH)")
    pa.set_defaults(fn=cmd_path)

    de = sub.add_parser("demo", help="generate text from the embedded model with the plugin on")
    de.add_argument("--model", help="GGUF file (default: the embedded SmolLM2-135M-Instruct Q4_1)")
    de.add_argument("--prompt", default="Write one sentence about the GPU in your computer:")
    de.add_argument("-n", "--tokens", type=int, default=64)
    de.set_defaults(fn=cmd_demo)

    mm = sub.add_parser("make-model", help="write a synthetic GGUF model (random weights, real shapes)")
    mm.add_argument("arch", choices=sorted(models.SHAPES))
    mm.add_argument("shape", help="; ".join(f"{a}: {', '.join(s)}" for a, s in models.SHAPES.items()))
    mm.add_argument("quant", help=", ".join(models.QUANTS))
    mm.add_argument("out")
    mm.add_argument("--seed", type=int, default=0)
    mm.add_argument("--vocab", help="take the tokenizer from this vocab file of the pinned tree instead (e.g. "
                    "llama-bpe), padded to the shape's vocabulary size: same weights and shapes")
    mm.add_argument("--head", choices=models.HEADS, default="random",
                    help="successor: an output head whose greedy choice is decisive (the input token's successor "
                    "under a fixed permutation), for top-1 checks; shapes with their own output head only")
    mm.set_defaults(fn=cmd_make_model)

    ex = sub.add_parser("explain", help="compile a model's decode graph and show the program and its byte floor")
    ex.add_argument("model")
    ex.add_argument("--sms", type=int, default=0, help="size the tiling for this many multiprocessors (default 132)")
    ex.add_argument("--bandwidth", type=float, default=3.0, help="memory bandwidth for the floor, TB/s (H100: 3.0)")
    ex.add_argument("--ctx", type=int, default=512)
    ex.add_argument("--flash-attn", action="store_true")
    ex.add_argument("--json", action="store_true", help="print the whole program as JSON")
    ex.set_defaults(fn=cmd_explain)

    bn = sub.add_parser("bench", help="llama-bench (or llama-cpp-python) stock vs megakernel: tok/s, tok/J, %% of floor",
                        description="Runs each test stock and with the plugin, alternated A B / B A over several "
                                    "rounds (same binary, same flags). Extra llama-bench flags go after --.")
    bn.add_argument("models", nargs="+", help="GGUF files")
    bn.add_argument("--llama-bench", help="llama-bench binary, or a llama.cpp tree / build directory holding one "
                                          "(default: $LLAMA_BENCH, then PATH)")
    bn.add_argument("-n", "--gen", default="128", help="generation lengths, comma-separated (default 128)")
    bn.add_argument("-p", "--prompt", default="", help="prompt lengths, comma-separated (default none)")
    bn.add_argument("-d", "--depth", default="0", help="context depths, comma-separated (default 0)")
    bn.add_argument("--flash-attn", default="", help="flash attention settings, e.g. 0,1 (default: llama-bench's)")
    bn.add_argument("--rounds", type=int, default=3, help="stock/megakernel pairs per test (default 3)")
    bn.add_argument("-r", "--reps", type=int, default=5, help="llama-bench repetitions per run (default 5)")
    bn.add_argument("--python", action="store_true", help="compare through llama-cpp-python's Llama.generate instead")
    bn.add_argument("--bandwidth", type=float, help="copy bandwidth in GB/s for the floor (default: measure it)")
    bn.add_argument("--no-energy", action="store_true", help="skip the NVML energy readings")
    bn.add_argument("--gpu-executor", choices=["1", "auto", "0"], default="1",
                    help="LLAMA_MEGAKERNEL_GPU for the megakernel side: 1 (default) every decode graph in the "
                         "megakernel, auto the faster path per model (measured on its first tokens), 0 none")
    bn.add_argument("--no-gpu-executor", dest="gpu_executor", action="store_const", const="0",
                    help="the same as --gpu-executor 0 (decode graphs then go back to stock)")
    bn.add_argument("--timeout", type=float, default=900, help="seconds per run (default 900)")
    bn.add_argument("--out", help="output path without suffix (default bench-results/DATE-bench): .json .md .png")
    bn.set_defaults(fn=cmd_bench)

    pt = sub.add_parser("patch", help="apply, check, revert or show llama-megakernel's llama.cpp patches")
    pt.add_argument("action", choices=["apply", "check", "revert", "status"])
    pt.add_argument("dir", help="a llama.cpp tree")
    pt.add_argument("--dry-run", action="store_true", help="compute and verify, change nothing")
    pt.set_defaults(fn=cmd_patch)

    fe = sub.add_parser("fetch-llama-cpp", help="put the pinned llama.cpp tree in DIR")
    fe.add_argument("dir")
    fe.add_argument("--git", metavar="REPO", help="clone this llama.cpp git repository (path or URL) at the pinned "
                                                  "commit instead of using the llama-cpp-python sdist")
    fe.set_defaults(fn=cmd_fetch_llama_cpp)

    bl = sub.add_parser("build-llama-cpp", help="configure and build a (patched) llama.cpp tree with CMake")
    bl.add_argument("dir")
    bl.add_argument("--cuda", action="store_true")
    bl.add_argument("--cuda-arch", default="native", help="CMAKE_CUDA_ARCHITECTURES (default: native)")
    bl.add_argument("--build-dir")
    bl.add_argument("--target", action="append", help="build only this target (repeatable)")
    bl.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 2)
    bl.add_argument("--cmake-arg", action="append", help="extra CMake argument (repeatable)")
    bl.set_defaults(fn=cmd_build_llama_cpp)

    ip = sub.add_parser("install-llama-cpp-python",
                        help="build and install llama-cpp-python 0.3.36 with the patches applied (honours CMAKE_ARGS)")
    ip.add_argument("--cuda", action="store_true", help="add -DGGML_CUDA=on to CMAKE_ARGS")
    ip.add_argument("--dry-run", action="store_true")
    ip.set_defaults(fn=cmd_install_llama_cpp_python)

    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if argv[:1] == ["bench"] and "--" in argv:  # bench: what follows -- goes to llama-bench untouched
        extra = argv[argv.index("--") + 1:]
        argv = argv[:argv.index("--")]
    args = p.parse_args(argv)
    args.extra = extra
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
