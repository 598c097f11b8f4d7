"""Batched generation from an HF Mixtral folder with [INST] prompts.

Left padding (so every prompt ends at the same position and the KV cache grows in step),
transformers' `generate` with its KV cache, greedy or temperature sampling, stop at `</s>`.
Prompts are token ids (`data.chat.encode_prompt` for chats, or raw completion prompts).
"""

from __future__ import annotations

from pathlib import Path

import torch
from train.console import progress as progress_lines

from data.chat import encode_prompt
from data.tokenizer import load_tokenizer
from model.router import fp32_router_logits


def load(model_path: str | Path, dtype: str = "auto", device: str | None = None):
    """(model, tokenizer) from an HF folder or hub name; safetensors only, no remote code."""
    from transformers import AutoModelForCausalLM

    p = str(model_path)
    if p.startswith(("/", "./", "../", "~")) and not Path(p).expanduser().is_dir():
        raise FileNotFoundError(f"model_path {p}: no such folder (an HF export folder, or a hub name like "
                                f"mistralai/Mixtral-8x7B-v0.1)")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = {"auto": torch.bfloat16 if device == "cuda" else torch.float32, "fp32": torch.float32,
                   "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch_dtype, trust_remote_code=False,
                                                 use_safetensors=True).to(device).eval()
    fp32_router_logits(model)  # route as training did (model/router.py), in bf16 too
    return model, load_tokenizer(model_path if Path(str(model_path)).is_dir() else None)


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int = 256, temperature: float = 0.0,
             batch_size: int = 8, seed: int = 0, progress: bool = True, desc: str = "generate") -> list[list[int]]:
    """Completion token ids for each prompt (without the prompt, without the final </s>)."""
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # similar lengths share a batch
    results: list[list[int]] = [None] * len(prompts)  # type: ignore[list-item]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for start in progress_lines(range(0, len(order), batch_size), desc, enabled=progress):
        idx = order[start:start + batch_size]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), tokenizer.pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            p = prompts[i]
            ids[r, width - len(p):] = torch.tensor(p)
            mask[r, width - len(p):] = 1
        if temperature > 0:
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                             do_sample=temperature > 0, temperature=temperature if temperature > 0 else None,
                             top_p=None, top_k=None, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id,
                             use_cache=True)
        for r, i in enumerate(idx):
            new = out[r, width:].tolist()
            if tokenizer.eos_id in new:
                new = new[:new.index(tokenizer.eos_id)]
            results[i] = [t for t in new if t != tokenizer.pad_id]
    return results


def chat_reply(model, tokenizer, messages: list[dict], max_new_tokens: int = 256, temperature: float = 0.0) -> str:
    """One assistant answer to a conversation ending with a user turn."""
    ids = generate(model, tokenizer, [encode_prompt(messages, tokenizer)], max_new_tokens, temperature,
                   batch_size=1, progress=False)[0]
    return tokenizer.decode(ids)
