"""A stage's run: torch.distributed started (NCCL on GPU, gloo on CPU), the config checked, the banner, and
the `Run` every function of a stage receives (rank, world, data- and sequence-parallel position, device, dtype,
the watchdog and the sequence-parallel groups). A stage's work runs inside it:

    with start(cfg) as run:
        ...   # an error that escapes waits for the watchdog to name a dead peer (train/faults.py)
"""

from __future__ import annotations

import datetime
import os
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
import torch.distributed as dist
from omegaconf import OmegaConf

from data.hub import HubUnreachable
from model import sequence_parallel
from model.sequence_parallel import SequenceParallel
from model.build import resolve_dtype
from model.distributed import accumulation_steps, batch_arithmetic, zero_stage
from train import console, faults, preflight
from train.checks import check_output_dir, start_afresh, validate
from train.contract import check_resume, complete_checkpoints, resume_history
from train.config import ConfigError
from train.memory_log import PhaseMemory
from train.stops import STOPS


@dataclass
class Run:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    dtype: torch.dtype
    out: Path
    gas: int
    sp: int = 1                       # sequence_parallel_size: consecutive ranks sharing each row
    grad_factor: int = 1              # the loss is multiplied by it before backward (sequence_parallel.gradient_factor)
    seq_parallel: SequenceParallel | None = None  # the sequence-parallel groups, made with the engine (build_engine)
    memory: PhaseMemory | None = None
    watchdog: faults.Watchdog | None = None  # this rank's heartbeat thread (train/faults.py)
    model_config: Any = None          # the MixtralConfig trained (model_path's config.json, or the preset)
    data_report: Any = None           # rank 0: the training data's DataReport (for the model card)
    final_metrics: dict = field(default_factory=dict)  # rank 0: the last metrics row
    t0: float = field(default_factory=lambda: console.STARTED)  # when the command started
    resume_from: Path | None = None   # a portable checkpoint to resume from (the layout changed)
    resumes: list = field(default_factory=list)  # rank 0: config.yaml's `resumes` (train/contract.py)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def __enter__(self) -> Run:
        return self

    def __exit__(self, kind, error, tb) -> bool:
        if error is not None and self.watchdog is not None:
            faults.after_failure(self.watchdog, error)
        return False

    def finished(self) -> None:
        """This rank ends on purpose (the run is over, or every rank stops together): the peers stop waiting for
        its heartbeat."""
        if self.watchdog is not None:
            self.watchdog.close(done=True)

    @property
    def sp_group(self):
        """This rank's sequence-parallel process group; None without sequence parallelism."""
        return self.seq_parallel.group if self.seq_parallel is not None else None

    @property
    def dp(self) -> int:
        """Data-parallel groups: each trains its own rows (world size / sequence_parallel_size)."""
        return self.world // self.sp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.sp

    def shard(self, batch: dict, pad_id: int) -> dict:
        """A micro-batch as this rank trains it, on its device: its share of each row's tokens (all of them
        without sequence parallelism), `labels` shifted to `targets` (model/sequence_parallel.py)."""
        b = sequence_parallel.shard(batch, self.rank % self.sp, self.sp, pad_id)
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in b.items()}

    def print(self, *args) -> None:
        if self.main:
            print(*args, flush=True)

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def all_sum(self, value) -> torch.Tensor:
        t = torch.as_tensor(value, dtype=torch.float64).clone()
        if dist.is_initialized():
            t = t.to(self.device) if self.device.type != "cpu" else t
            dist.all_reduce(t)
        return t.cpu()


def start(cfg) -> Run:
    """Initialise torch.distributed (NCCL on GPU, gloo on CPU), validate the config, seed, banner."""
    import deepspeed

    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        validate(cfg, world_size=world)
        check_output_dir(cfg)
        check_resume(cfg)
        model_cfg = preflight.model_config_of(cfg)
        holds = preflight.check(cfg, world, preflight.local_world_size(), resolve_dtype(cfg.precision), model_cfg)
    except (ConfigError, HubUnreachable) as e:  # one line, before anything loads
        if os.environ.get("RANK", "0") == "0":
            print(f"config error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if "RANK" not in os.environ:  # plain `python train/sft.py`: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(29500 + os.getpid() % 1000)))
    out = Path(cfg.output_dir)
    if os.environ["RANK"] == "0":
        start_afresh(cfg)
    out.mkdir(parents=True, exist_ok=True)
    with console.build_output_to(out / "build.log"):  # DeepSpeed compiles its CPU collective op here
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo",
                                   timeout=datetime.timedelta(seconds=cfg.dist_timeout_s), verbose=False)
    rank = dist.get_rank()
    STOPS.install(cfg.stage)  # Ctrl-C / SIGTERM: stop between steps with a checkpoint (train/stops.py)
    random.seed(cfg.seed + rank)
    np.random.seed(cfg.seed + rank)
    torch.manual_seed(cfg.seed)
    history = []
    if rank == 0:  # what this segment runs with, and what each resume changed (train/contract.py)
        tags = complete_checkpoints(out / "checkpoints")
        history = resume_history(cfg, int(tags[-1].name.split("_")[1]) if tags else None)
        (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True)
                                         + (yaml.safe_dump({"resumes": history}, sort_keys=False) if history else ""))
    sp = cfg.sequence_parallel_size
    run = Run(rank=rank, world=world, local_rank=local_rank, device=device, dtype=resolve_dtype(cfg.precision),
              out=out, gas=accumulation_steps(cfg, world), sp=sp, resumes=history, model_config=model_cfg,
              grad_factor=sequence_parallel.gradient_factor(zero_stage(cfg.deepspeed), sp),
              watchdog=faults.Watchdog(rank, world, cfg.dist_timeout_s, cfg.stage))
    run.barrier()
    faults.pause_if("pause", 0, lambda: STOPS.signum)  # tests: a Ctrl-C before the first step
    run.memory = PhaseMemory(run, cfg.stage)
    run.print(f"[{cfg.stage}] {world} rank(s) on {device.type}, {run.dtype}, ZeRO-{zero_stage(cfg.deepspeed)}, "
              f"expert_parallel_size={cfg.expert_parallel_size}"
              + (f", sequence_parallel_size={sp}" if sp > 1 else ""))
    run.print(f"[{cfg.stage}] batch: {batch_arithmetic(cfg, world)}")
    run.print(f"[{cfg.stage}] layout: {holds}")
    if zero_stage(cfg.deepspeed) == 3 and not cfg.model.gradient_checkpointing:
        run.print(f"[{cfg.stage}] note: ZeRO-3 without model.gradient_checkpointing=true keeps every layer's gathered "
                  f"expert weights alive from its forward to its backward (autograd saves views of them)")
    return run
