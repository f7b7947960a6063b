"""The synthetic model factory: every architecture and quant type loads in stock llama-cpp-python and
generates with finite logits."""

from __future__ import annotations

import json

import numpy as np
import pytest

from llama_megakernel import models

from conftest import ARCHS, run_py, tiny_model

QUANTS = list(models.QUANTS)

LOAD_AND_GENERATE = """
import json, sys, numpy as np, llama_cpp
res = {}
for path, steps in json.loads(sys.argv[1] if len(sys.argv) > 1 else %r):
    llm = llama_cpp.Llama(model_path=path, n_ctx=512, n_threads=2, verbose=False)
    toks = llm.tokenize(b"Once upon a time")
    llm.eval(toks)
    finite, out = True, []
    for i in range(steps):
        row = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
        finite &= bool(np.isfinite(row).all())
        out.append(int(row.argmax()))
        llm.eval([out[-1]])
    res[path] = {"finite": finite, "ftype": llm.metadata.get("general.file_type"), "arch":
                 llm.metadata.get("general.architecture"), "distinct": len(set(out)), "n_vocab": llm.n_vocab()}
    del llm
print(json.dumps(res))
"""


@pytest.mark.parametrize("arch", ARCHS)
def test_every_quant_loads_and_generates(arch):
    import llama_cpp

    paths = {q: tiny_model(arch, q) for q in QUANTS}
    jobs = [(str(p), 8) for p in paths.values()]
    r = run_py(LOAD_AND_GENERATE % (json.dumps(jobs),))
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    for q, p in paths.items():
        got = res[str(p)]
        assert got["arch"] == arch
        assert got["finite"], f"{arch} {q}: non-finite logits"
        assert int(got["ftype"]) == getattr(llama_cpp, models.QUANTS[q]), f"{arch} {q}: file type {got['ftype']}"


@pytest.mark.parametrize("arch", ARCHS)
def test_long_generation_stays_finite_and_varied(arch):
    path = tiny_model(arch, "F32")
    r = run_py(LOAD_AND_GENERATE % (json.dumps([(str(path), 200)]),))
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])[str(path)]
    assert got["finite"]
    assert got["distinct"] > 20, "greedy output collapsed to a few tokens: weight scales are off"


def test_bad_arguments_are_clear_errors(tmp_path):
    with pytest.raises(models.ModelFactoryError, match="unknown architecture"):
        models.make_model("mamba", "tiny", "F16", tmp_path / "x.gguf")
    with pytest.raises(models.ModelFactoryError, match="unknown shape"):
        models.make_model("llama", "70b", "F16", tmp_path / "x.gguf")
    with pytest.raises(models.ModelFactoryError, match="unknown quant"):
        models.make_model("llama", "tiny", "IQ2_XS", tmp_path / "x.gguf")


def test_padded_vocabulary(tmp_path):
    # Qwen3.5's real vocabulary (248,320) is larger than the vocab file's; the factory pads it.
    from gguf import GGUFWriter

    w = GGUFWriter(str(tmp_path / "v.gguf"), "llama")
    n = models._copy_tokenizer(w, models.pinned.vocab_path("qwen35"), 160000)
    assert n == 160000


@pytest.mark.parametrize("arch", ARCHS)
def test_f16_base_loads_and_generates(arch, tmp_path):
    # Real shapes start from an F16 base (tiny ones from F32); write a tiny model through that path.
    s = models.SHAPES[arch]["tiny"]
    path = tmp_path / f"{arch}-f16base.gguf"
    models._write_base(arch, s, path, np.float16, seed=1, progress=None)
    r = run_py(LOAD_AND_GENERATE % (json.dumps([(str(path), 16)]),))
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])[str(path)]
    assert got["finite"] and got["distinct"] > 4
