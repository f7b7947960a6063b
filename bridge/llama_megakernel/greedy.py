"""Greedy decoding that records every step's logits, through unchanged llama-cpp-python calls.

Run it as its own process, once with the plugin and once without, and compare the two files: the stock run
never loads the plugin, so it is the reference.

    python -m llama_megakernel.greedy MODEL OUT.npz --steps 32 [--plugin] [--flash-attn]

With --force-tokens EARLIER.npz the run feeds that run's tokens instead of its own argmax, so that per-step
logits of two runs are compared on the same contexts even after a near-tie flips one token.

OUT.npz holds `tokens` (prompt + generated), `logits` (steps x n_vocab, float32, the distribution each
generated token was chosen from) and, with --plugin, `status` (the plugin's counters as JSON).
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def run(model: str, steps: int, plugin: bool, flash_attn: bool = False, prompt: str = "The quick brown fox",
        n_ctx: int = 512, n_threads: int | None = None, n_gpu_layers: int = -1, verbose: bool = False,
        cpu_executor: bool | None = None, shuffle_seed: int | None = None, force_tokens=None):
    if plugin:
        import llama_megakernel

        llama_megakernel.enable(cpu_executor=cpu_executor, shuffle_seed=shuffle_seed)
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
        tok = int(np.argmax(row)) if force_tokens is None else int(force_tokens[n_prompt + i])
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
    p.add_argument("--cpu-executor", action="store_true", help="run the plugin's programs on the CPU")
    p.add_argument("--shuffle", type=int, default=None, help="CPU executor: random valid tile order, this seed")
    p.add_argument("--n-ctx", type=int, default=512)
    p.add_argument("--force-tokens", metavar="NPZ",
                   help="feed the tokens of an earlier run (teacher forcing) so both runs see the same contexts")
    # llama-cpp-python 0.3.36 on a self-built CUDA llama.cpp (LLAMA_CPP_LIB_PATH) was seen to segfault inside
    # Llama(verbose=False) on an H100, plugin or not; verbose=True avoids that path.
    p.add_argument("--verbose", action="store_true")
    a = p.parse_args(argv)
    forced = np.load(a.force_tokens)["tokens"] if a.force_tokens else None
    tokens, n_prompt, logits, status = run(a.model, a.steps, a.plugin, a.flash_attn, a.prompt, n_ctx=a.n_ctx,
                                           n_threads=a.threads, verbose=a.verbose,
                                           cpu_executor=True if a.cpu_executor else None, shuffle_seed=a.shuffle,
                                           force_tokens=forced)
    np.savez(a.out, tokens=tokens, n_prompt=n_prompt, logits=logits, status=json.dumps(status))
    return 0


if __name__ == "__main__":
    sys.exit(main())
