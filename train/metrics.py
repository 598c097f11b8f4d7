"""Rank 0's view of a run: progress bar or plain lines, `<output_dir>/metrics.jsonl`, optional wandb, and the
expert-load bookkeeping (dead-expert warnings, heatmaps)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from model.distributed import all_reduce_here
from model.router import expert_counts, router_statistics
from train import console, faults
from train.runtime import Run


class RouterStep:
    """One optimizer step's router terms on this rank: aux and z averaged over its micro-batches, expert
    assignments counted. `means(run)` averages aux and z over the ranks (a sequence-parallel group's ranks
    hold the same values); `Metrics.expert_load(counts_LE)` sums the counts."""

    def __init__(self, num_layers: int, num_experts: int, top_k: int, gas: int):
        self.top_k, self.gas = top_k, gas
        self.aux = self.z = 0.0
        self.counts_LE = torch.zeros(num_layers, num_experts, dtype=torch.float64)

    def add(self, router_logits, mask: torch.Tensor, aux: torch.Tensor, z: torch.Tensor) -> None:
        self.aux += aux.item() / self.gas
        self.z += z.item() / self.gas
        self.counts_LE += expert_counts(router_logits, self.top_k, mask).cpu().double()

    def means(self, run: Run) -> tuple[float, float]:
        return float(run.all_sum(self.aux)) / run.world, float(run.all_sum(self.z)) / run.world


def step_values(engine, guard: faults.NonFinite, batches, step: int, skipped: int, lr: float) -> dict:
    """The metrics every stage logs after optimizer step `step`: the rate `lr` that step applied (read before
    it: afterwards `engine.get_lr()` is the next step's), gradient norm, data position, skips."""
    norm = engine.get_global_grad_norm()  # every layout measures it (model.distributed.settle_zero0 for ZeRO-0)
    return {"lr": lr, "grad_norm": None if norm is None else float(norm),
            "epoch": batches.epoch(step), "rows": batches.global_rows(step - 1),
            "skipped": skipped, "skipped_total": guard.total}


class Metrics:
    """Rank 0's view of a run: tqdm bar, `<output_dir>/metrics.jsonl`, optional wandb, expert-load
    bookkeeping (dead-expert warnings, heatmaps). Counts are reduced over ranks in `expert_load`."""

    def __init__(self, cfg, run: Run, start_step: int, num_layers: int, num_experts: int):
        self.cfg, self.run = cfg, run
        self.path = run.out / "metrics.jsonl"
        self.t0, self.start_step = time.time(), start_step
        self.last = time.time()
        self.idle_steps = np.zeros((num_layers, num_experts), dtype=np.int64)
        self.wandb = None
        self.bar = None
        if not run.main:
            return
        if self.path.exists():  # keep exactly one line per step across resumes
            kept = [l for l in _complete_lines(self.path) if json.loads(l)["step"] <= start_step]
            self.path.write_text("".join(l + "\n" for l in kept))
        from tqdm import tqdm

        self.bar = tqdm(total=cfg.max_steps, initial=start_step, desc=cfg.stage, dynamic_ncols=True,
                        disable=not console.is_terminal())
        if cfg.logging.backend == "wandb":
            import wandb

            self.wandb = wandb.init(project=cfg.logging.project, name=cfg.logging.run_name, mode=cfg.logging.mode,
                                    dir=str(run.out), config=OmegaConf.to_container(cfg, resolve=True, enum_to_str=True), resume="allow")

    def expert_load(self, counts_LE: torch.Tensor) -> dict:
        """All-reduce a step's assignment counts and return the statistics (all ranks call)."""
        return router_statistics(all_reduce_here(counts_LE.to(torch.float64)))

    def log(self, step: int, values: dict, stats: dict) -> None:
        memory = self.run.memory
        if memory is not None and "first_step" not in memory.phases:  # all ranks: a collective
            memory.end("first_step")
            values = {**values, "memory": memory.summary()}
        if self.run.watchdog is not None:
            self.run.watchdog.step = step
        if not self.run.main:
            return
        now = time.time()
        dt, self.last = now - self.last, now
        values = {"step": step, **values, "tokens_per_s": values.get("tokens", 0) / max(dt, 1e-9),
                  "step_time_s": dt, "elapsed_s": now - self.t0,
                  "expert_load": stats["load"], "dead_experts": stats["dead_experts"],
                  "max_share": stats["max_share"], "load_entropy": stats["load_entropy"]}
        with open(self.path, "a") as f:
            f.write(json.dumps(values) + "\n")
        self.run.final_metrics = values
        if values.get("skipped"):
            self.bar.write(f"[{self.cfg.stage}] warning: step {step} skipped: non-finite loss or gradient "
                           f"({values.get('skipped_total')} skipped so far)")
        load = np.asarray(stats["load"])
        self.idle_steps = np.where(load == 0, self.idle_steps + 1, 0)
        n = self.cfg.logging.dead_expert_steps
        for layer, expert in zip(*np.nonzero(self.idle_steps == n)):
            self.bar.write(f"[{self.cfg.stage}] warning: layer {layer} expert {expert} received no token for {n} steps")
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{values['loss']:.4f}", tok_s=f"{values['tokens_per_s']:.0f}")
            self.bar.update(step - self.bar.n)
        if self.bar.disable and step % max(1, self.cfg.logging.log_every) == 0:  # no tty: plain lines
            done = max(1, step - self.start_step)
            elapsed = now - self.t0
            reward = (f", reward accuracy {values['rewards/accuracy']:.2f} margin {values['rewards/margins']:.4f}"
                      if "rewards/accuracy" in values else "")
            print(f"[{self.cfg.stage}] step {step}/{self.cfg.max_steps} {console.loss_terms(values, self.cfg)}{reward}"
                  f", lr {values.get('lr', 0):.2e}, {values['tokens_per_s']:.0f} tok/s, {console.duration(elapsed)} "
                  f"elapsed, ETA {console.duration(elapsed / done * (self.cfg.max_steps - step))}", flush=True)
        if self.wandb is not None:
            flat = {k: v for k, v in values.items() if isinstance(v, (int, float))}
            for layer, row in enumerate(stats["load"]):
                flat[f"expert_load/layer{layer}_max_share"] = stats["max_share"][layer]
                flat[f"expert_load/layer{layer}_dead"] = stats["dead_experts"][layer]
            if step % max(1, self.cfg.logging.heatmap_every) == 0:
                import matplotlib.pyplot as plt
                import wandb

                fig = load_heatmap(load, f"{self.cfg.stage} step {step}")
                flat["expert_load/heatmap"] = wandb.Image(fig)
                plt.close(fig)
            self.wandb.log(flat, step=step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()


def _complete_lines(path: Path) -> list[str]:
    """Lines of a JSONL file, without a last line cut short by a kill in the middle of writing it."""
    lines = [l for l in path.read_text().splitlines() if l.strip()]
    if lines:
        try:
            json.loads(lines[-1])
        except json.JSONDecodeError:
            lines.pop()
    return lines


def load_heatmap(load_LE: np.ndarray, title: str, path: str | Path | None = None):
    """Layers × experts heatmap of assignment fractions; returns the matplotlib figure (or saves it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    load_LE = np.asarray(load_LE)
    fig, ax = plt.subplots(figsize=(1 + 0.5 * load_LE.shape[1], 1 + 0.4 * load_LE.shape[0]))
    im = ax.imshow(load_LE, vmin=0, vmax=max(2.0 / load_LE.shape[1], float(load_LE.max())), cmap="viridis", aspect="auto")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="fraction of assignments")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=100)
        plt.close(fig)
    return fig
