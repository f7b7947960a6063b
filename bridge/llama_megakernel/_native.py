"""cffi view of the plugin and of the ggml that llama-cpp-python already loaded.

Order matters: llama_cpp is imported first (it loads libllama.so and, through it, libggml.so.0 and
libggml-base.so.0). ggml is then opened by soname with RTLD_NOLOAD, which returns the objects already in the
process and never a second copy; the plugin's own DT_NEEDED entries resolve to the same objects.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from cffi import FFI

from . import pinned

_HERE = Path(__file__).resolve().parent
PLUGIN_NAME = "libggml-megakernel.so"


class MegakernelError(RuntimeError):
    """The plugin cannot be used in this process; the message says why and what to do."""


class IncompatibleVersionError(MegakernelError):
    pass


def plugin_path() -> Path:
    """The plugin library: LLAMA_MEGAKERNEL_PLUGIN if set, else the one installed with this package."""
    given = os.environ.get("LLAMA_MEGAKERNEL_PLUGIN")
    p = Path(given) if given else _HERE / PLUGIN_NAME
    if not p.is_file():
        raise MegakernelError(
            f"plugin library not found at {p}; reinstall llama-megakernel (pip install .) "
            "or set LLAMA_MEGAKERNEL_PLUGIN to a built libggml-megakernel.so")
    return p


def _header_cdef() -> str:
    for cand in (_HERE / "llama-megakernel.h", _HERE.parent.parent / "csrc" / "llama-megakernel.h"):
        if cand.is_file():
            m = re.search(r"/\* cffi-begin \*/(.*)/\* cffi-end \*/", cand.read_text(), re.S)
            if m:
                return m.group(1)
    raise MegakernelError("llama-megakernel.h is missing from the installation")


ffi = FFI()
ffi.cdef(_header_cdef())
ffi.cdef("""
    const char * ggml_version(void);
    const char * ggml_commit(void);
    typedef struct ggml_backend_reg * ggml_backend_reg_t;
    ggml_backend_reg_t ggml_backend_load(const char * path);
    size_t ggml_backend_reg_count(void);
    ggml_backend_reg_t ggml_backend_reg_get(size_t index);
    const char * ggml_backend_reg_name(ggml_backend_reg_t reg);
""")


def check_versions(llama_cpp_version: str, ggml_version: str) -> None:
    """Refuse any llama-cpp-python / ggml but the pinned ones: the plugin reads ggml's internal structs."""
    problems = []
    if llama_cpp_version != pinned.LLAMA_CPP_PYTHON_VERSION:
        problems.append(f"llama-cpp-python {llama_cpp_version} (need {pinned.LLAMA_CPP_PYTHON_VERSION})")
    if ggml_version != pinned.GGML_VERSION:
        problems.append(f"ggml {ggml_version} (need {pinned.GGML_VERSION})")
    if problems:
        raise IncompatibleVersionError(
            "llama-megakernel cannot run with " + " and ".join(problems) + ": it is built for llama.cpp "
            f"{pinned.LLAMA_CPP_COMMIT} as vendored in llama-cpp-python {pinned.LLAMA_CPP_PYTHON_VERSION}. "
            f"Install that version (pip install llama-cpp-python=={pinned.LLAMA_CPP_PYTHON_VERSION}); "
            "nothing was changed in this process.")


class Native:
    """The loaded plugin plus the process's ggml. One per process."""

    def __init__(self) -> None:
        import llama_cpp  # loads libllama and the ggml it links against

        try:
            self.ggml_base = ffi.dlopen("libggml-base.so.0", ffi.RTLD_NOW | ffi.RTLD_NOLOAD)
            self.ggml = ffi.dlopen("libggml.so.0", ffi.RTLD_NOW | ffi.RTLD_NOLOAD)
        except OSError as e:
            raise MegakernelError(
                f"llama-cpp-python's ggml libraries are not loaded in this process ({e}); "
                "is llama_cpp importable?") from e
        self.ggml_version = ffi.string(self.ggml_base.ggml_version()).decode()
        check_versions(llama_cpp.__version__, self.ggml_version)

        self.path = plugin_path()
        try:
            self.lib = ffi.dlopen(str(self.path), ffi.RTLD_NOW | ffi.RTLD_LOCAL)
        except OSError as e:
            raise MegakernelError(f"cannot load the plugin {self.path}: {e}") from e
        if self.lib.llama_mk_api_version() != 1:
            raise MegakernelError(f"{self.path} speaks plugin API {self.lib.llama_mk_api_version()}, expected 1")
        # Register it the way llama.cpp tools do with GGML_BACKEND_PATH: ggml keeps the handle and calls
        # ggml_backend_init(), which installs the interception.
        if self.ggml.ggml_backend_load(str(self.path).encode()) == ffi.NULL:
            raise MegakernelError(f"ggml refused to load {self.path} (see ggml's log above)")

    def info(self) -> dict:
        return json.loads(ffi.string(self.lib.llama_mk_info_json()).decode())

    def _json(self, fn):
        size = 1 << 16
        while True:  # graphs computed between the two calls can make the text longer
            buf = ffi.new("char[]", size)
            need = fn(buf, size)
            if need <= size:
                return json.loads(ffi.string(buf).decode())
            size = need

    def status(self) -> dict:
        return self._json(self.lib.llama_mk_status_json)

    def explain(self):
        return self._json(self.lib.llama_mk_explain_json)

    def supported(self) -> dict:
        return self._json(self.lib.llama_mk_supported_json)

    def watch_model_loads(self) -> None:
        """Tell the plugin the architecture of every model llama-cpp-python loads from now on, so that graphs of
        an unsupported architecture are handed back with its name in the reason."""
        import ctypes

        import llama_cpp.llama_cpp as ll

        load = ll.llama_model_load_from_file
        if getattr(load, "_megakernel", False):
            return
        lib = self.lib

        def load_and_note(path_model, params):
            model = load(path_model, params)
            if model:
                buf = ctypes.create_string_buffer(128)
                if ll.llama_model_meta_val_str(model, b"general.architecture", buf, len(buf)) > 0:
                    lib.llama_mk_note_model_arch(buf.value)
            return model

        load_and_note._megakernel = True
        ll.llama_model_load_from_file = load_and_note

    def op_test(self, what: str, ggml_type: int, flash_attn: bool = False, n_kv: int = 64, seed: int = 0) -> dict:
        """Compare ggml-cpu and the CPU executor on one op or layer (see csrc/op-test.cpp). For "glu", n_kv is
        the ggml_glu_op to test."""
        w = what.encode()
        return self._json(lambda buf, size: self.lib.llama_mk_op_test(w, ggml_type, int(flash_attn), n_kv, seed,
                                                                         buf, size))

    def dequantize(self, ggml_type: int, data: bytes, n: int):
        import numpy as np

        out = np.empty(n, np.float32)
        src = ffi.from_buffer(data)
        if self.lib.llama_mk_dequantize(ggml_type, src, n, ffi.cast("float *", ffi.from_buffer(out))) != 0:
            raise MegakernelError(f"the plugin cannot dequantize ggml type {ggml_type} ({n} values)")
        return out

    def copy_bandwidth_gbs(self, device: int = 0) -> float | None:
        """Device-to-device copy rate (read + write, GB/s) measured by the plugin; None without CUDA."""
        v = self.lib.llama_mk_copy_bandwidth_gbs(device)
        return v if v > 0 else None

    def registries(self) -> list[str]:
        return [ffi.string(self.ggml.ggml_backend_reg_name(self.ggml.ggml_backend_reg_get(i))).decode()
                for i in range(self.ggml.ggml_backend_reg_count())]
