"""LLAMA_MEGAKERNEL=1: enable the plugin as soon as llama_cpp is imported, with no change to user code.

Imported at interpreter start by llama_megakernel.pth (installed into site-packages), and only when the
variable is set. It waits for `import llama_cpp` to finish, then calls enable(), so the interception is in
place before any Llama(...) context exists. A failure is reported on stderr and llama.cpp runs stock.
"""

import importlib.abc
import importlib.util
import sys


def _enable_now() -> None:
    try:
        import llama_megakernel

        llama_megakernel.enable()
    except Exception as e:  # never break the user's import: run stock and say why
        sys.stderr.write(f"llama-megakernel: LLAMA_MEGAKERNEL is set but the plugin was not enabled: {e}\n")


class _AfterLlamaCppImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "llama_cpp":
            return None
        sys.meta_path.remove(self)  # let the other finders locate the real package
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_enable(module):
            exec_module(module)
            _enable_now()

        spec.loader.exec_module = exec_then_enable
        return spec


if "llama_cpp" in sys.modules:
    _enable_now()
else:
    sys.meta_path.insert(0, _AfterLlamaCppImport())
