"""llama.cpp reads the export: `convert_hf_to_gguf.py` (the script llama.cpp ships, vendored in the
llama-cpp-python sdist) converts it, every GGUF tensor equals the export's, and — where llama-cpp-python is
installed (marker `llama_cpp`: it compiles llama.cpp) — llama.cpp's logits equal transformers'.

The converter is looked up in $LLAMA_CPP_DIR, else `.cache/llama.cpp` (.ci/run fetches it there:
`pip download --no-binary :all: llama-cpp-python` and unpacks convert_hf_to_gguf.py, conversion/ and gguf-py/).
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from helpers import REPO, run_stage

LLAMA_CPP = Path(os.environ.get("LLAMA_CPP_DIR", REPO / ".cache" / "llama.cpp"))


def _need_converter():
    if not (LLAMA_CPP / "convert_hf_to_gguf.py").is_file():
        if os.environ.get("CI"):
            pytest.fail(f"{LLAMA_CPP}/convert_hf_to_gguf.py is missing: .ci/run fetches it")
        pytest.skip(f"llama.cpp's converter is not in {LLAMA_CPP} (set LLAMA_CPP_DIR; .ci/run fetches it)")


@pytest.fixture(scope="module", params=["full", "qlora"])
def export(request, tmp_path_factory):
    """A full fine-tune's export, and a QLoRA run's (its 16-bit base read back from model_path, adapters merged)."""
    root = tmp_path_factory.mktemp("gguf")
    args = ["recipe=tiny/sft", "max_steps=4", "deepspeed=zero0", "data.synthetic_samples=64"]
    if request.param == "qlora":
        pytest.importorskip("bitsandbytes")
        from omegaconf import OmegaConf

        from model.build import build_model
        from train.config import compose

        build_model(OmegaConf.to_container(compose("sft", ["recipe=tiny/sft"]).model), seed=3).save_pretrained(root / "base")
        args = [*args, f"model_path={root / 'base'}", "model.quantize=nf4", "lora.enabled=true", "max_steps=2"]
    run_stage("sft", root / "sft", args, nproc=1)
    return root / "sft" / "hf"


@pytest.fixture(scope="module")
def gguf_file(export):
    _need_converter()
    out = export.parent / "model-f32.gguf"
    env = {**os.environ, "PYTHONPATH": str(LLAMA_CPP / "gguf-py")}
    proc = subprocess.run([sys.executable, str(LLAMA_CPP / "convert_hf_to_gguf.py"), str(export), "--outfile", str(out),
                           "--outtype", "f32"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's q/k row order for its rotary kernel (LlamaModel.permute in its converter)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_gguf_tensors_and_metadata_equal_the_export(export, gguf_file):
    sys.path.insert(0, str(LLAMA_CPP / "gguf-py"))
    from gguf import GGUFReader
    from transformers import AutoConfig

    from data.tokenizer import load_tokenizer

    config = AutoConfig.from_pretrained(export)
    with safe_open(export / "model.safetensors", "pt") as f:
        hf = {k: f.get_tensor(k) for k in f.keys()}
    expected = {"token_embd.weight": hf["model.embed_tokens.weight"], "output_norm.weight": hf["model.norm.weight"],
                "output.weight": hf["lm_head.weight"]}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        moe = p + "block_sparse_moe."
        experts = range(config.num_local_experts)
        expected.update({
            f"blk.{i}.attn_norm.weight": hf[p + "input_layernorm.weight"],
            f"blk.{i}.ffn_norm.weight": hf[p + "post_attention_layernorm.weight"],
            f"blk.{i}.attn_q.weight": _permute(hf[p + "self_attn.q_proj.weight"], config.num_attention_heads),
            f"blk.{i}.attn_k.weight": _permute(hf[p + "self_attn.k_proj.weight"], config.num_key_value_heads),
            f"blk.{i}.attn_v.weight": hf[p + "self_attn.v_proj.weight"],
            f"blk.{i}.attn_output.weight": hf[p + "self_attn.o_proj.weight"],
            f"blk.{i}.ffn_gate_inp.weight": hf[moe + "gate.weight"],
            f"blk.{i}.ffn_gate_exps.weight": torch.stack([hf[f"{moe}experts.{e}.w1.weight"] for e in experts]),
            f"blk.{i}.ffn_down_exps.weight": torch.stack([hf[f"{moe}experts.{e}.w2.weight"] for e in experts]),
            f"blk.{i}.ffn_up_exps.weight": torch.stack([hf[f"{moe}experts.{e}.w3.weight"] for e in experts]),
        })
    reader = GGUFReader(gguf_file)
    got = {t.name: np.asarray(t.data) for t in reader.tensors}
    assert set(got) == set(expected), sorted(set(got) ^ set(expected))
    for name, want in expected.items():
        assert got[name].shape == tuple(want.shape), (name, got[name].shape, want.shape)
        assert np.array_equal(got[name], want.numpy()), name
    assert len({got[f"blk.0.ffn_gate_exps.weight"][e].tobytes() for e in range(config.num_local_experts)}) == 8

    def field(key):
        f = reader.fields[key]
        return f.contents() if hasattr(f, "contents") else f.parts[f.data[0]].tolist()

    assert field("general.architecture") == "llama"
    assert field("llama.expert_count") == 8 and field("llama.expert_used_count") == 2
    assert (field("tokenizer.ggml.bos_token_id"), field("tokenizer.ggml.eos_token_id")) == (1, 2)
    assert field("tokenizer.ggml.add_bos_token") is True
    assert "[INST] " in field("tokenizer.chat_template")
    sp = load_tokenizer(export).sp
    tokens = field("tokenizer.ggml.tokens")
    assert len(tokens) == 32000 and all(tokens[i] == sp.id_to_piece(i) for i in range(0, 32000, 97))


@pytest.mark.llama_cpp
def test_llama_cpp_logits_equal_transformers(export, gguf_file):
    """llama.cpp (through llama-cpp-python) computes the same next-token logits as transformers. In CI (CI set) the
    oracle must run: a missing llama-cpp-python fails the test instead of skipping it."""
    if os.environ.get("CI"):
        import llama_cpp
    else:
        llama_cpp = pytest.importorskip("llama_cpp")
    from transformers import AutoModelForCausalLM

    from data.chat import encode_prompt
    from data.tokenizer import load_tokenizer

    tok = load_tokenizer(export)
    ids = encode_prompt([{"role": "user", "content": "Name three prime numbers and say why."}], tok)
    llm = llama_cpp.Llama(model_path=str(gguf_file), n_ctx=256, logits_all=True, verbose=False, n_threads=2)
    assert llm.tokenize("[INST] Name three prime numbers and say why. [/INST]".encode(), add_bos=True) == ids
    llm.eval(ids)
    ours = np.asarray(llm.scores[: len(ids)], dtype=np.float64)
    model = AutoModelForCausalLM.from_pretrained(export).eval()
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].double().numpy()
    diff = np.abs(ours - ref).max()
    print(f"llama.cpp vs transformers: max |Δ logit| {diff:.2e} over {len(ids)} positions × 32000 "
          f"(max |logit| {np.abs(ref).max():.2f})")
    assert diff <= 1e-3 * max(1.0, np.abs(ref).max()), diff
