"""Generation throughput of eval/generate.py: batched vs one prompt at a time, same prompts (CPU).

    python bench/generation.py [--model tiny|small] [--prompts 32] [--new 32] [--batch 16]

Greedy decoding with the KV cache; prints new tokens/s for both and, last, the ratio:
    generation batched/single tokens/s: X.XX
"""

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from omegaconf import OmegaConf


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="tiny")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--batch", type=int, default=16)
    a = p.parse_args()
    from data.chat import encode_prompt
    from data.synthetic import sft_chats
    from data.tokenizer import default_tokenizer_path
    from eval.generate import generate, load
    from model.build import build_model
    from train.config import compose

    tmp = Path(tempfile.mkdtemp())
    build_model(OmegaConf.to_container(compose("sft", [f"model={a.model}"]).model), seed=0).save_pretrained(tmp)
    shutil.copy(default_tokenizer_path(), tmp / "tokenizer.model")
    model, tok = load(tmp)
    model.generation_config.min_new_tokens = a.new  # same work on both sides: no early </s>
    prompts = [encode_prompt(c["messages"][:-1], tok) for c in sft_chats(a.prompts, seed=1)]
    generate(model, tok, prompts[:2], max_new_tokens=4, batch_size=2, progress=False)  # warm-up
    rates = {}
    for name, bs in (("single", 1), ("batched", a.batch)):
        t0 = time.time()
        outs = generate(model, tok, prompts, max_new_tokens=a.new, batch_size=bs, progress=False)
        rates[name] = sum(len(o) for o in outs) / (time.time() - t0)
        print(f"{name:8s} (batch {bs:2d}): {rates[name]:8.0f} new tokens/s over {len(prompts)} prompts")
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"generation batched/single tokens/s: {rates['batched'] / rates['single']:.2f}")


if __name__ == "__main__":
    main()
