"""Small helpers the stage scripts share: distributed start, data rows, the engine,
checkpoints, and metric logging. The training loops themselves live in each stage script.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from data.dataset import DataReport, fit_pairs, load_canonical, pack_rows, tokenize
from data.formats import RecordError
from model.build import build_model, model_folder, resolve_dtype
from model.distributed import batch_arithmetic, deepspeed_config, fp32_master_shared, mark_moe_leaf_modules, zero_stage
from model.head import install_loss_head
from model import sequence_parallel
from model.load import Placement, check_expert_placement, expert_parallel_rank
from model.router import router_statistics
from train import console, elastic, faults, preflight
from train.config import ConfigError, check_output_dir, start_afresh, validate
from train.memory_log import PhaseMemory, set_mmap_threshold

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")


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
    memory: PhaseMemory | None = None
    model_config: Any = None          # the MixtralConfig trained (model_path's config.json, or the preset)
    data_report: Any = None           # rank 0: the training data's DataReport (for the model card)
    final_metrics: dict = field(default_factory=dict)  # rank 0: the last metrics row
    t0: float = field(default_factory=lambda: console.STARTED)  # when the command started
    resume_from: Path | None = None   # a portable checkpoint to resume from (the layout changed)

    @property
    def main(self) -> bool:
        return self.rank == 0

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
        return {k: v.to(self.device) for k, v in b.items()}

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
        model_cfg = preflight.model_config_of(cfg)
        holds = preflight.check(cfg, world, preflight.local_world_size(), resolve_dtype(cfg.precision), model_cfg)
    except ConfigError as e:
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
    faults.WATCHDOG[0] = faults.Watchdog(rank, world, cfg.dist_timeout_s, cfg.stage)
    random.seed(cfg.seed + rank)
    np.random.seed(cfg.seed + rank)
    torch.manual_seed(cfg.seed)
    sp = cfg.sequence_parallel_size
    run = Run(rank=rank, world=world, local_rank=local_rank, device=device, dtype=resolve_dtype(cfg.precision),
              out=Path(cfg.output_dir), gas=cfg.global_batch_size // (cfg.micro_batch_size * (world // sp)),
              sp=sp, model_config=model_cfg)
    if run.main:
        (run.out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    run.barrier()
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


def training_rows(cfg, kind: str, tokenizer, run: Run):
    """Load, tokenize (rank 0 first, cached) and pack the training data; prints the data report."""
    report = DataReport()
    cache_dir = cfg.data.cache_dir or str(run.out / "cache")
    rows = None
    for turn in (0, 1):  # rank 0 fills the cache, then the others read it
        error = None
        if (turn == 0) == run.main:
            try:
                records = load_canonical(cfg.data, kind, cfg.seed, skipped_path=run.out / "skipped.jsonl", report=report)
            except RecordError as e:  # named by file and line; stop every rank before any heavy work
                error = f"data error: {e}\n  (data.on_error=skip skips bad records, counts them and lists them in " \
                        f"{run.out / 'skipped.jsonl'})" if cfg.data.on_error == "raise" else f"data error: {e}"
            if error is None:
                ds = tokenize(records, kind, tokenizer, cache_dir)
                if kind == "preference":
                    rows = fit_pairs(ds, cfg.max_seq_len, cfg.dpo.max_prompt_len, report)
                else:
                    rows = pack_rows(zip(ds["input_ids"], ds["labels"]), cfg.max_seq_len, tokenizer.pad_id,
                                     packing=cfg.data.packing, overlong=cfg.data.overlong, kind=kind, report=report)
        shared = [error]
        if dist.is_initialized() and run.world > 1:
            dist.broadcast_object_list(shared, src=0)  # also the barrier between the two turns
        if shared[0] is not None:
            if run.main:
                print(f"[{cfg.stage}] {shared[0]}", file=sys.stderr, flush=True)
            faults.finished()
            sys.exit(2)
    run.data_report = report
    for line in report.lines():
        run.print(f"[{cfg.stage}] data: {line}")
    if report.skipped:
        run.print(f"[{cfg.stage}] data: skipped records are listed in {run.out / 'skipped.jsonl'}")
    if len(rows) < cfg.global_batch_size:
        run.print(f"[{cfg.stage}] note: {len(rows)} rows < global_batch_size {cfg.global_batch_size}; rows repeat within a step")
    return rows, report


def lr_lambda(cfg):
    warmup, total, floor = cfg.optim.warmup_steps, cfg.max_steps, cfg.optim.min_lr_ratio

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.optim.schedule == "constant":
            return 1.0
        if cfg.optim.schedule == "wsd":  # warmup-stable-decay: constant, then linear to the floor at the end
            decay = max(1, round(cfg.optim.decay_fraction * (total - warmup)))
            return floor + (1 - floor) * min(1.0, (total - 1 - step) / decay)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if cfg.optim.schedule == "linear":
            return floor + (1 - floor) * (1 - progress)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def build_engine(cfg, model, run: Run):
    """DeepSpeed engine with our AdamW and LR schedule (DeepSpeed steps both at accumulation boundaries)."""
    import deepspeed

    ds = deepspeed_config(cfg, run.world, run.dtype, run.model_config)
    prepare_elastic_resume(cfg, run, ds)
    if zero_stage(ds) == 3 and cfg.expert_parallel_size == 1:
        mark_moe_leaf_modules(model)
    made = []

    def make_optimizer(_params):
        # Called by DeepSpeed after AutoEP has swapped in its expert modules, so the groups hold the
        # live parameters; ZeRO-1/2 with EP also need the expert weights in their own "moe" groups.
        params = [p for p in model.parameters() if p.requires_grad]
        groups = [g for g in ({"name": "decay", "params": [p for p in params if p.ndim >= 2],
                               "weight_decay": cfg.optim.weight_decay},
                              {"name": "no_decay", "params": [p for p in params if p.ndim < 2], "weight_decay": 0.0})
                  if g["params"]]
        if cfg.expert_parallel_size > 1 and zero_stage(ds) in (1, 2):
            from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

            groups = split_params_into_different_moe_groups_for_optimizer(groups)
        if cfg.optim.name == "sgd":
            made.append(faults.guarded(torch.optim.SGD)(groups, lr=cfg.optim.lr))
        else:
            # torch's fused AdamW kernel (CPU and CUDA): one pass over each tensor instead of ~10 element-wise
            # ops; 6x faster per step on CPU (BENCHMARKS.md).
            fused = all(p.device.type in ("cpu", "cuda") for p in params)
            made.append(faults.guarded(torch.optim.AdamW)(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                                          eps=cfg.optim.eps, fused=fused))
        return made[-1]

    mpu = sequence_parallel.setup(model, run.sp, cfg.micro_batch_size)
    run.grad_factor = sequence_parallel.gradient_factor(zero_stage(ds), run.sp)
    with fp32_master_shared():
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=make_optimizer, config=ds, mpu=mpu,
                                               lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg)))
    check_expert_placement(engine.module, placement(cfg, run, ds))
    set_mmap_threshold((4 if zero_stage(ds) == 3 else 32) * 2**20)  # training: see memory_log.set_mmap_threshold
    run.memory.end("engine")
    if run.world == 1 and zero_stage(ds) == 0 and run.dtype == torch.float32:
        # One process, plain fp32 ZeRO-0: DeepSpeed's gradient "all-reduce" would flatten every gradient into a
        # bucket, reduce it over one rank and copy it back (~3% of a CPU step, BENCHMARKS.md).
        engine.enable_backward_allreduce = False
    return engine, faults.NonFinite(made[-1], cfg.max_bad_steps)


def stop_if_diverged(engine, cfg, run: Run, guard: faults.NonFinite, step: int) -> None:
    """After `max_bad_steps` non-finite steps in a row: checkpoint (the weights are those before the bad
    steps, which were skipped) and stop with status 3."""
    if not guard.must_stop:
        return
    save_checkpoint(engine, cfg, run, step)
    run.print(f"[{cfg.stage}] stopping: {guard.in_a_row} optimizer steps in a row (up to step {step}) had a non-finite "
              f"loss or gradient and were skipped ({guard.total} in all). Checkpoint saved in {checkpoint_dir(run)}. "
              f"Lower optim.lr, raise optim.warmup_steps or check the data, then rerun with resume=true.")
    faults.finished()
    sys.exit(3)


def placement(cfg, run: Run, ds: dict | None = None) -> Placement:
    """What this rank keeps of the weights under the stage's layout (model/load.py)."""
    ds = ds if ds is not None else deepspeed_config(cfg, run.world, run.dtype, run.model_config)
    ep = int(ds.get("expert_parallel", {}).get("autoep_size", 1))
    return Placement(zero_stage=zero_stage(ds), ep_size=ep, ep_rank=expert_parallel_rank(run.rank, ep), ds_config=ds)


def load_model(cfg, run: Run, ds: dict | None = None, phase: str = "load"):
    """The stage's HF Mixtral, built for this rank's share of the layout (ZeRO-3 partitions, or dense +
    this rank's experts under expert parallelism; `ds` is the engine's DeepSpeed config, default the
    stage's), with a `LossHead` as its LM head (model/head.py). A hub `model_path` is downloaded by one
    rank per node first. Peak memory from here to the end is recorded as `phase`."""
    set_mmap_threshold(2**20)  # loading and engine set-up free many MB-sized tensors: give them back to the OS
    run.memory.begin()
    if cfg.model_path is not None and not os.path.isdir(os.path.expanduser(cfg.model_path)):
        if run.local_rank == 0:
            model_folder(cfg.model_path)
        run.barrier()
    model = build_model(OmegaConf.to_container(cfg.model, resolve=True), model_path=cfg.model_path,
                        dtype=run.dtype, seed=cfg.seed, placement=placement(cfg, run, ds))
    install_loss_head(model)
    run.memory.end(phase)
    return model


# ---------------------------------------------------------------------------------------------
# checkpoints

def checkpoint_dir(run: Run) -> Path:
    return run.out / "checkpoints"


def complete_checkpoints(ckpt: Path) -> list[Path]:
    """The published `step_<n>` folders, oldest first (a folder gets that name only once complete)."""
    return sorted((p for p in ckpt.glob("step_*") if p.is_dir()), key=lambda p: int(p.name.split("_")[1]))


def prepare_elastic_resume(cfg, run: Run, ds: dict) -> None:
    """Before `deepspeed.initialize`: when `resume=true` finds a checkpoint written under another world size,
    expert-parallel size or ZeRO stage, convert it to a portable checkpoint (train/elastic.py) that
    `maybe_resume` loads into the new engine. A changed global batch or LoRA setting is refused."""
    ckpt = checkpoint_dir(run)
    tags = complete_checkpoints(ckpt) if cfg.resume and ckpt.is_dir() else []
    run.resume_from = elastic.prepare(cfg, run, ds, ckpt, tags, lambda message: _refuse(cfg, run, message))


def _refuse(cfg, run: Run, message: str) -> None:
    if run.main:
        print(f"[{cfg.stage}] config error: {message}", file=sys.stderr, flush=True)
    faults.finished()
    sys.exit(2)


def save_checkpoint(engine, cfg, run: Run, step: int, extra: dict | None = None) -> None:
    """Checkpoint `step_<n>`: DeepSpeed's files plus the data position (`client_state["step"]`) and every
    rank's RNG states. Atomic: everything is written under `.step_<n>.partial`; after a barrier (every
    rank done) rank 0 renames it to `step_<n>` and then replaces `latest` (write + rename), so a crash at
    any point leaves the previous checkpoint as the one `resume=true` loads. Only the newest
    `keep_checkpoints` are kept."""
    ckpt = checkpoint_dir(run)
    final, partial = ckpt / f"step_{step}", ckpt / f".step_{step}.partial"
    if run.main:
        shutil.rmtree(partial, ignore_errors=True)  # debris of a crash mid-save
        shutil.rmtree(final, ignore_errors=True)    # an older run's step_<n> beyond where we resumed
    run.barrier()
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    # plain tensors and lists only, so resuming loads it with torch.load(weights_only=True)
    rng = {"python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
           "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss], "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    partial.mkdir(parents=True, exist_ok=True)
    torch.save(rng, partial / f"rng_rank{run.rank}.pt")
    engine.save_checkpoint(str(ckpt), tag=partial.name, client_state={"step": step, **(extra or {})}, save_latest=False)
    if run.main:
        (partial / elastic.LAYOUT_FILE).write_text(json.dumps(elastic.checkpoint_record(engine, cfg, run.world, step)))
    faults.kill_self_if("kill_in_save", step)  # tests: die with the files written but not yet published
    run.barrier()
    if run.main:
        os.replace(partial, final)
        tmp = ckpt / "latest.tmp"
        tmp.write_text(final.name)
        os.replace(tmp, ckpt / "latest")
        tags = complete_checkpoints(ckpt)
        for old in tags[:-cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    run.barrier()


def maybe_resume(engine, cfg, run: Run) -> tuple[int, dict]:
    """Load the newest complete checkpoint when `resume=true`; returns (step to start at, client state).
    DeepSpeed's own files are unpickled with torch.load(weights_only=True) plus an allow-list of the few
    DeepSpeed classes they hold (`safe_checkpoint_loading`); our RNG files are plain tensors."""
    ckpt = checkpoint_dir(run)
    if not cfg.resume:
        return 0, {}
    if not (ckpt / "latest").is_file():
        run.print(f"[{cfg.stage}] resume=true but no checkpoint in {ckpt}: starting from step 0")
        return 0, {}
    # A `step_<n>` folder gets its name only once complete, so the newest one is the one to load
    # (`latest` may lag behind it by one if the crash fell between the rename and `latest`'s update).
    tags = complete_checkpoints(ckpt)
    if not tags:
        raise RuntimeError(f"{ckpt / 'latest'} exists but {ckpt} holds no complete step_<n> checkpoint")
    tag = tags[-1].name
    run.barrier()
    if run.main:
        for debris in ckpt.glob(".step_*.partial"):
            run.print(f"[{cfg.stage}] removing {debris} (a checkpoint interrupted while being written)")
            shutil.rmtree(debris, ignore_errors=True)
    if run.resume_from is not None:  # another layout: the portable checkpoint, re-sliced for this one
        p = placement(cfg, run)
        step = elastic.load_portable(engine, run.resume_from, run.model_config, p.ep_size, p.ep_rank)["step"]
        run.print(f"[{cfg.stage}] resumed from {run.resume_from} at step {step} (random states start afresh "
                  f"from seed {cfg.seed}: the old ranks' states do not map onto the new ones)")
        return step, {"step": step}
    with safe_checkpoint_loading(engine):
        path, client = engine.load_checkpoint(str(ckpt), tag=tag)
    if path is None:
        raise RuntimeError(f"could not load checkpoint {ckpt / tag}")
    step = int(client["step"])
    rng = torch.load(ckpt / tag / f"rng_rank{run.rank}.pt", weights_only=True)
    version, state, gauss_next = rng["python"]
    random.setstate((version, tuple(state), gauss_next))
    kind, keys, pos, has_gauss, gauss = rng["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    run.print(f"[{cfg.stage}] resumed from {ckpt / tag} at step {step}")
    return step, client


@contextlib.contextmanager
def safe_checkpoint_loading(engine):
    """Make DeepSpeed's checkpoint engine unpickle with `weights_only=True`, allowing only the DeepSpeed
    and Python classes its files are known to hold (loss scalers, enums, ...); anything else fails
    loudly instead of running code from the checkpoint."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    ce = getattr(engine, "checkpoint_engine", None)
    if not isinstance(ce, TorchCheckpointEngine):
        yield
        return
    original = ce.load

    def load(path, map_location=None):
        with torch.serialization.safe_globals(deepspeed_checkpoint_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)

    ce.load = load
    try:
        yield
    finally:
        ce.load = original


def deepspeed_checkpoint_globals() -> list:
    """The non-tensor classes DeepSpeed 0.19's ZeRO 0-3 / MoE checkpoints pickle (found by loading
    every file of each kind of checkpoint with weights_only=True; tests/distributed resume them all)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def finish(engine, cfg, run: Run, model, tokenizer, step: int) -> None:
    """Teardown of every stage: final checkpoint, HF export (with LoRA: the PEFT adapter folder and
    merged weights), and the check that the export's logits equal the live model's."""
    if "first_step" in run.memory.phases:
        run.memory.end("later_steps")  # the steady state: the optimizer's states exist from the first step on
    if cfg.checkpoint_every:
        save_checkpoint(engine, cfg, run, step)
    if cfg.export:
        run.memory.begin()
        _export(engine, cfg, run, model, tokenizer)
        run.memory.end("export")
    run.memory.save()
    if run.main:
        final = run.final_metrics
        results = [f"{step} steps; final {console.loss_terms(final, cfg)}" if final else f"{step} steps"]
        if "rewards/accuracy" in final:
            results.append(f"final reward accuracy {final['rewards/accuracy']:.3f}, margin {final['rewards/margins']:.4f}")
        if run.memory.phases:
            results.append("peak RSS per rank: " + ", ".join(
                f"{phase} {max(p['peak_rss_bytes']) / 2**30:.2f} GiB" for phase, p in run.memory.phases.items()))
        files = [run.out / n for n in ("config.yaml", "metrics.jsonl", "memory.json", "skipped.jsonl", "build.log",
                                       "checkpoints", "adapter", "hf")]
        console.summary(cfg.stage, time.time() - run.t0, results, files)
    faults.finished()


def _export(engine, cfg, run: Run, model, tokenizer) -> None:
    from model.card import model_card
    from model.export import export_hf, live_probe, release_zero3_params, verify_export
    from model.lora import lora_scaling, merged_for_export, save_adapter
    from model.memory import parameter_counts

    t0 = time.time()
    release_zero3_params(engine)
    probe = live_probe(engine) if cfg.verify_export else None  # before peft merges expert adapters in place
    module, scaling = engine.module, None
    if cfg.lora.enabled:
        save_adapter(module, run.out / "adapter", run.main, cfg.model_path)
        if cfg.lora.experts:
            module = merged_for_export(module)  # peft merges expert adapters (ZeRO ≤ 2)
        else:
            scaling = lora_scaling(cfg.lora)    # export_hf merges W + B·A·scaling per gathered weight
    card = None
    if run.main:
        card = model_card(cfg, vars(run.data_report) if run.data_report else {}, run.final_metrics,
                          parameter_counts(run.model_config)["total"], cfg.recipe_name, cfg.hub.repo_id)
    export_hf(module, model.config, run.out / "hf", tokenizer.path, dtype=run.dtype, lora_scaling=scaling,
              training_config=OmegaConf.to_yaml(cfg, resolve=True), card=card)
    run.print(f"[{cfg.stage}] exported {run.out / 'hf'} in {time.time() - t0:.1f}s")
    if cfg.verify_export:
        e = verify_export(engine, run.out / "hf", probe)
        if run.main:
            run.print(f"[{cfg.stage}] export check: probe model.export.probe_ids(vocab {model.config.vocab_size}), "
                      f"2 × {probe[0].shape[1] if probe else 32} tokens; live logits sum {e['live_sum']:.6f}; "
                      f"max |logits(export) - logits(live)| = {e['max_abs_diff']:.2e} "
                      f"(tolerance {e['tol']:g} × {e['scale']:.3g})")
    if cfg.hub.repo_id and run.main:
        push_to_hub(run.out / "hf", cfg.hub.repo_id, cfg.hub.private, run, cfg.stage)


def push_to_hub(folder: Path, repo_id: str, private: bool, run: Run, stage: str) -> None:
    """Upload the export to the Hugging Face Hub (rank 0). A failure (offline, no token, no permission)
    is one line: the export stays complete on disk."""
    try:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(repo_id, private=private, exist_ok=True)
        url = api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message=f"mixtral-tune {stage} export")
        run.print(f"[{stage}] pushed {folder} to {url}")
    except Exception as e:  # noqa: BLE001 - any reason, one line
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        run.print(f"[{stage}] hub: could not push {folder} to {repo_id} ({type(e).__name__}: {reason[:200]}); "
                  f"the export is complete on disk: retry with `huggingface-cli upload {repo_id} {folder}`")


# ---------------------------------------------------------------------------------------------
# metrics

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
                                    dir=str(run.out), config=OmegaConf.to_container(cfg, resolve=True), resume="allow")

    def expert_load(self, counts_LE: torch.Tensor) -> dict:
        """All-reduce a step's assignment counts and return the statistics (all ranks call)."""
        counts = counts_LE.to(torch.float64)
        if dist.is_initialized():
            dist.all_reduce(counts)
        return router_statistics(counts)

    def log(self, step: int, values: dict, stats: dict) -> None:
        memory = self.run.memory
        if memory is not None and "first_step" not in memory.phases:  # all ranks: a collective
            memory.end("first_step")
            values = {**values, "memory": memory.summary()}
        if faults.WATCHDOG[0] is not None:
            faults.WATCHDOG[0].step = step
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

