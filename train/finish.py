"""The end of every stage: the final checkpoint, the Hugging Face export (LoRA: the adapter folder and the
merged weights), the check that the export's logits equal the live model's, the push to the Hub, the summary."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from train import console, faults
from train.checkpoints import checkpoint_dir, save_checkpoint
from train.contract import complete_checkpoints
from train.runtime import Run


def finish(engine, cfg, run: Run, model, tokenizer, step: int) -> None:
    """Teardown of every stage: final checkpoint, HF export (with LoRA: the PEFT adapter folder and
    merged weights), and the check that the export's logits equal the live model's."""
    if "first_step" in run.memory.phases:
        run.memory.end("later_steps")  # the steady state: the optimizer's states exist from the first step on
    kept = cfg.checkpoint_every or bool(complete_checkpoints(checkpoint_dir(run)))
    if kept:  # the end too, where this run keeps checkpoints (by count, by time, or the one it resumed from)
        save_checkpoint(engine, cfg, run, step)
    if cfg.export:
        run.memory.begin()
        _export(engine, cfg, run, model, tokenizer, step)
        run.memory.end("export")
    run.memory.save()
    if run.main:
        final = run.final_metrics
        results = [f"{step} steps; final {console.loss_terms(final, cfg)}" if final else f"{step} steps"]
        if "rewards/accuracy" in final:
            results.append(f"final reward accuracy {final['rewards/accuracy']:.3f}, margin {final['rewards/margins']:.4f}")
        if "drift/kl_layers" in final:  # train/dpo.py: the policy's routers against the reference's
            kl = final["drift/kl_layers"]
            most = sorted(range(len(kl)), key=lambda l: -kl[l])[:3]
            results.append(f"routing drift at step {final['step']}: mean router KL(policy ‖ reference) "
                           f"{final['drift/kl']:.4f}, load shift {final['drift/load_shift']:.3f}; moved most: "
                           + ", ".join(f"layer {l} (KL {kl[l]:.4f}, shift {final['drift/load_shift_layers'][l]:.3f})"
                                       for l in most))
        if run.memory.phases:
            results.append("peak RSS per rank: " + ", ".join(
                f"{phase} {max(p['peak_rss_bytes']) / 2**30:.2f} GiB" for phase, p in run.memory.phases.items()))
        files = [run.out / n for n in ("config.yaml", "metrics.jsonl", "memory.json", "skipped.jsonl", "build.log",
                                       "checkpoints", "adapter", "hf")]
        console.summary(cfg.stage, time.time() - run.t0, results, files)
    run.finished()


def _export(engine, cfg, run: Run, model, tokenizer, step: int) -> None:
    from model.card import model_card
    from model.export import export_hf, live_probe, release_zero3_params, verify_export
    from model.lora import lora_scaling, merged_for_export, save_adapter
    from model.memory import parameter_counts

    t0 = time.time()
    release_zero3_params(engine)
    probe = live_probe(engine, run.seq_parallel) if cfg.verify_export else None  # before peft merges expert adapters in place
    module, scaling, base = engine.module, None, None
    if cfg.model.quantize != "none" and cfg.model_path:  # QLoRA: the 4-bit base is written from its 16-bit original
        from model.build import model_folder
        from model.weights import Checkpoint

        base = Checkpoint(model_folder(cfg.model_path))
    if cfg.lora.enabled:
        save_adapter(module, run.out / "adapter", run.main, cfg.model_path)
        if cfg.lora.experts and cfg.model.quantize == "none":
            module = merged_for_export(module)  # peft merges expert adapters (ZeRO ≤ 2)
        else:  # export_hf merges W + B·A·scaling per gathered weight (and 4-bit experts' own adapters)
            scaling = lora_scaling(cfg.lora)
    card = None
    if run.main:
        card = model_card(cfg, vars(run.data_report) if run.data_report else {}, run.final_metrics,
                          parameter_counts(run.model_config)["total"], cfg.recipe_name, cfg.hub.repo_id,
                          tokenizer.version, run.resumes)
    export_hf(module, model.config, run.out / "hf", tokenizer.path, dtype=run.dtype, lora_scaling=scaling,
              training_config=OmegaConf.to_yaml(cfg, resolve=True), card=card, base=base)
    run.print(f"[{cfg.stage}] exported {run.out / 'hf'} in {time.time() - t0:.1f}s")
    if run.main and faults.inject("corrupt_export", step):
        faults.swap_two_experts(run.out / "hf")
    if cfg.verify_export:
        e = verify_export(engine, run.out / "hf", probe, run.dtype, base)
        evidence = (f"probe model.export.probe_ids(vocab {model.config.vocab_size}), 2 × {probe[0].shape[1]} tokens, "
                    f"{str(run.dtype).removeprefix('torch.')}; live logits sum {e['live_sum']:.6f}; "
                    f"max |logits(export) - logits(live)| = {e['max_abs_diff']:.2e} (tolerance {e['tol']:g} × {e['scale']:.3g})")
        if not e["passed"]:
            _export_check_failed(cfg, run, evidence)
        run.print(f"[{cfg.stage}] export check: {evidence}")
    if cfg.hub.repo_id and run.main:
        push_to_hub(run.out / "hf", cfg.hub.repo_id, cfg.hub.private, run, cfg.stage)


def _export_check_failed(cfg, run: Run, evidence: str) -> None:
    """Every rank ends here together (the verdict was broadcast): the export moves to `hf.check_failed/` with
    a note saying why, one line tells the user, status 4. The trained weights stay on disk in that folder (and
    in the final checkpoint when checkpoints are on)."""
    import os
    import shutil

    failed = run.out / "hf.check_failed"
    if run.main:
        shutil.rmtree(failed, ignore_errors=True)
        os.replace(run.out / "hf", failed)
        (failed / "EXPORT_CHECK_FAILED.txt").write_text(
            "These weights are the trained model's, but their logits did not match the live model's:\n"
            f"{evidence}\nDo not publish them as they are; please report this with the run's config.yaml.\n")
        print(f"[{cfg.stage}] export check failed: {evidence}; the export is kept in {failed} (not hf/)"
              + (f", the trained state in {run.out / 'checkpoints'}" if complete_checkpoints(checkpoint_dir(run)) else ""),
              file=sys.stderr, flush=True)
    run.barrier()
    run.finished()
    sys.exit(4)


def push_to_hub(folder: Path, repo_id: str, private: bool, run: Run, stage: str) -> None:
    """Upload the export to the Hugging Face Hub (rank 0). A failure (offline, no token, no permission)
    is one line: the export stays complete on disk."""
    try:
        from huggingface_hub import HfApi

        from data.hub import online, why_offline

        if not online():  # seconds, not a minute of retries
            raise ConnectionError(why_offline())
        api = HfApi()
        api.create_repo(repo_id, private=private, exist_ok=True)
        url = api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message=f"mixtral-tune {stage} export")
        run.print(f"[{stage}] pushed {folder} to {url}")
    except Exception as e:  # noqa: BLE001 - any reason, one line
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        run.print(f"[{stage}] hub: could not push {folder} to {repo_id} ({type(e).__name__}: {reason[:200]}); "
                  f"the export is complete on disk: retry with `hf upload {repo_id} {folder}` (after `hf auth login`)")
