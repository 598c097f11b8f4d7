"""One rank of bench/zero_memory.py: build our engine for one ZeRO/EP setting, take two optimizer steps,
and count every live tensor's storage on this rank (weights, gradients, optimizer state, DeepSpeed's
fp32 partitions and buckets) after each backward (the peak: gradients exist, activations freed) and
after each step; print rank 0's JSON line with every rank's peak."""

import gc
import json
import resource
import sys

import torch
import torch.distributed as dist


def live_tensor_bytes() -> int:
    seen, total = set(), 0
    for obj in gc.get_objects():
        try:
            if not isinstance(obj, torch.Tensor) or obj.device.type != "cpu":
                continue
            storage = obj.untyped_storage()
        except Exception:  # DeepSpeed's partitioned placeholders and other odd objects
            continue
        key = storage.data_ptr()
        if key and key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total


def main() -> None:
    from model.head import NO_LOGITS
    from model.losses import IGNORE_INDEX, causal_lm_loss
    from train.model_setup import build_engine, load_model
    from train.runtime import start
    from train.config import compose

    overrides = sys.argv[1:]
    cfg = compose("sft", ["model=small", "max_seq_len=256", "global_batch_size=4", "micro_batch_size=2",
                          "output_dir=/tmp/bench_zero_memory", "overwrite=true", "export=false", "router.aux_loss_coef=0", *overrides])
    run = start(cfg)
    gc.collect()
    before = live_tensor_bytes()
    model = load_model(cfg, run)
    engine, _ = build_engine(cfg, model, run)
    head = model.get_output_embeddings()
    del model
    g = torch.Generator().manual_seed(run.rank)
    peak = 0
    for _ in range(2):  # Adam's state exists after the first step; the peak is step 2 before its update
        ids = torch.randint(3, 32000, (cfg.micro_batch_size, cfg.max_seq_len), generator=g)
        out = engine(input_ids=ids, use_cache=False, output_hidden_states=True, logits_to_keep=NO_LOGITS)
        targets = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], IGNORE_INDEX)], 1)
        loss = causal_lm_loss(out.hidden_states[-1], head, targets) / ids.numel()
        engine.backward(loss)
        del out, loss
        gc.collect()
        peak = max(peak, live_tensor_bytes() - before)  # weights + gradients + optimizer state
        engine.step()
    gc.collect()
    state = max(peak, live_tensor_bytes() - before)
    n_params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in engine.module.parameters())
    mine = {"rank": run.rank, "state_mb": state / 2**20, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "params_m": n_params / 1e6}
    rows = [None] * run.world
    dist.all_gather_object(rows, mine)
    if run.main:
        print("RESULT " + json.dumps(rows), flush=True)
    # end like a stage: stop this rank's watchdog thread, which otherwise still talks to the rendezvous store
    # while the interpreter shuts down (seen once: "terminate called without an active exception", SIGABRT)
    run.finished()


if __name__ == "__main__":
    main()
