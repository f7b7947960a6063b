"""llama-megakernel: llama.cpp decode as one persistent kernel launch per token.

    import llama_megakernel
    llama_megakernel.enable()          # before Llama(...): routes llama.cpp's graphs through the plugin
    llm = llama_cpp.Llama(model_path)  # unchanged code
    print(llama_megakernel.status())   # graphs seen / handled / handed back, with reasons

Without editing code: ``LLAMA_MEGAKERNEL=1 python your_script.py`` enables it when ``llama_cpp`` is imported
(a .pth hook installed with the package; see _autoload.py).

Graphs the plugin does not execute go to the stock backend unchanged, with the reason counted.
"""

from __future__ import annotations

import threading

from ._native import IncompatibleVersionError, MegakernelError, check_versions, plugin_path
from .pinned import GGML_VERSION, LLAMA_CPP_COMMIT, LLAMA_CPP_PYTHON_VERSION

__version__ = "0.1.0"
__all__ = [
    "enable", "disable", "status", "info", "supported", "reset_counters", "plugin_path", "is_enabled", "explain",
    "dequantize",
    "MegakernelError", "IncompatibleVersionError", "check_versions",
    "LLAMA_CPP_PYTHON_VERSION", "LLAMA_CPP_COMMIT", "GGML_VERSION",
]

_lock = threading.Lock()
_loaded = None  # the Native instance once enable() ran (not the _native module)


def _load():
    global _loaded
    with _lock:
        if _loaded is None:
            from ._native import Native

            _loaded = Native()
        return _loaded


def _mode(v) -> int:
    if v == "auto":
        return 2
    if isinstance(v, bool):
        return 1 if v else 0
    raise ValueError(f"executor mode {v!r}: expected True, False or 'auto'")


def enable(cpu_executor: bool | str | None = None, shuffle_seed: int | None = None,
           gpu_executor: bool | str | None = None) -> dict:
    """Load the plugin (once) and route graphs through it. Call before creating the Llama context: backends
    created earlier are not intercepted. Raises MegakernelError (or IncompatibleVersionError) with the reason
    if it cannot; nothing in the process is changed then.

    gpu_executor=True runs compiled decode programs on CUDA backends (the megakernel; the same as
    LLAMA_MEGAKERNEL_GPU=1), "auto" times each model's first decode tokens on both paths and keeps the faster
    (LLAMA_MEGAKERNEL_GPU=auto), False hands them to stock; None keeps the current setting (off unless the
    variable says otherwise). cpu_executor takes the same values for CPU backends (slow; for tests and debugging
    without a GPU; LLAMA_MEGAKERNEL_CPU). Turn it on before the model loads: it keeps ggml-cpu from
    repacking Q4_0/Q4_K weights into a layout the executor does not read. shuffle_seed runs the CPU executor's
    tiles in a random valid order (LLAMA_MEGAKERNEL_SHUFFLE); None keeps the current setting, -1 canonical."""
    modes = {k: _mode(v) for k, v in (("cpu", cpu_executor), ("gpu", gpu_executor)) if v is not None}
    n = _load()
    if "cpu" in modes:
        n.lib.llama_mk_set_cpu_executor(modes["cpu"])
    if "gpu" in modes:
        n.lib.llama_mk_set_gpu_executor(modes["gpu"])
    if shuffle_seed is not None:
        n.lib.llama_mk_set_shuffle_seed(shuffle_seed)
    n.watch_model_loads()
    n.lib.llama_mk_set_enabled(1)
    return n.info()


def disable() -> None:
    """Hand every graph straight to the stock backend (the plugin stays loaded, counting nothing)."""
    if _loaded is not None:
        _loaded.lib.llama_mk_set_enabled(0)


def is_enabled() -> bool:
    return _loaded is not None and bool(_loaded.lib.llama_mk_get_enabled())


def status() -> dict:
    """Counters: graphs_seen, graphs_handled, graphs_handed_back, decode_graphs_seen, reasons (reason ->
    count), last_graphs (the latest distinct graphs with their op and weight-type summaries)."""
    if _loaded is None:
        return {"loaded": False, "enabled": False}
    s = _loaded.status()
    s["loaded"] = True
    s["top_reasons"] = sorted(s["reasons"].items(), key=lambda kv: -kv[1])[:5]
    return s


def info() -> dict:
    """Build information of the loaded plugin (versions, CUDA architectures, GPUs it sees)."""
    return _load().info()


def supported() -> dict:
    """What the plugin takes: architectures verified end to end, graph ops, gated activations, weight types."""
    return _load().supported()


def explain():
    """The last program the plugin compiled, as a dict (instructions, tiles, bytes, serial edges), or None."""
    return _load().explain()


def dequantize(ggml_type: int, data: bytes, n: int):
    """n values of ggml type `ggml_type` from raw GGUF block bytes, dequantized by the plugin's own code."""
    return _load().dequantize(ggml_type, data, n)


def reset_counters() -> None:
    if _loaded is not None:
        _loaded.lib.llama_mk_reset_counters()
