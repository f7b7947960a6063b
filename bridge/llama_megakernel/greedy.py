"""Greedy decoding that records every step's logits, through unchanged llama-cpp-python calls.

Run it as its own process, once with the plugin and once without, and compare the two files: the stock run
never loads the plugin, so it is the reference.

    python -m llama_megakernel.greedy MODEL OUT.npz --steps 32 [--plugin] [--flash-attn]

OUT.npz holds `tokens` (prompt + generated), `logits` (steps x n_vocab, float32, the distribution each
generated token was chosen from) and, with --plugin, `status` (the plugin's counters as JSON).
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def run(model: str, steps: int, plugin: bool, flash_attn: bool = False, prompt: str = "The quick brown fox",
        n_ctx: int = 512, n_threads: int | None = None, n_gpu_layers: int = -1, verbose: bool = False):
    if plugin:
        import llama_megakernel

        llama_megakernel.enable()
    import llama_cpp

    llm = llama_cpp.Llama(model_path=model, n_ctx=n_ctx, n_gpu_layers=n_gpu_layers, flash_attn=flash_attn,
                          n_threads=n_threads, seed=0, verbose=verbose)
    n_vocab = llm.n_vocab()
    tokens = llm.tokenize(prompt.encode())
    n_prompt = len(tokens)
    logits = np.empty((steps, n_vocab), np.float32)
    llm.eval(tokens)
    for i in range(steps):
        row = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
        logits[i] = row
        tok = int(np.argmax(row))
        tokens.append(tok)
        if i + 1 < steps:
            llm.eval([tok])
    status = None
    if plugin:
        import llama_megakernel

        status = llama_megakernel.status()
    return np.array(tokens, np.int32), n_prompt, logits, status


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m llama_megakernel.greedy")
    p.add_argument("model")
    p.add_argument("out")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--plugin", action="store_true")
    p.add_argument("--flash-attn", action="store_true")
    p.add_argument("--prompt", default="The quick brown fox")
    p.add_argument("--threads", type=int, default=None)
    # llama-cpp-python 0.3.36 on a self-built CUDA llama.cpp (LLAMA_CPP_LIB_PATH) was seen to segfault inside
    # Llama(verbose=False) on an H100, plugin or not; verbose=True avoids that path.
    p.add_argument("--verbose", action="store_true")
    a = p.parse_args(argv)
    tokens, n_prompt, logits, status = run(a.model, a.steps, a.plugin, a.flash_attn, a.prompt, n_threads=a.threads,
                                           verbose=a.verbose)
    np.savez(a.out, tokens=tokens, n_prompt=n_prompt, logits=logits, status=json.dumps(status))
    return 0


if __name__ == "__main__":
    sys.exit(main())
