"""Elastic resume: continue a checkpoint on another world size, expert-parallel size or ZeRO stage.

Every checkpoint carries `layout.json` (the layout that wrote it, the step, the optimizer's and the LR
schedule's step counts). When `resume=true` finds one written under another layout, rank 0 converts it
once into a *portable* checkpoint, `checkpoints/portable/step_<n>/`: per trainable parameter, one file
`<name>.pt` = {"fp32": master weights, "exp_avg": ..., "exp_avg_sq": ...}, every tensor whole and
flattened, under the names and layout of the model without expert parallelism:

    model.layers.L.mlp.experts.gate_up_proj   [E, 2I, H]  = cat(AutoEP's w1 [E, I, H], w3 [E, I, H], dim 1)
    model.layers.L.mlp.experts.down_proj      [E, H, I]  = AutoEP's w2
    model.layers.L.mlp.gate.weight            [E, H]     = AutoEP's mlp.router.gate.weight

The source is DeepSpeed's universal checkpoint (`deepspeed.checkpoint.ds_to_universal`, which gathers
ZeRO-1/2/3 partitions and AutoEP's expert files) or, for ZeRO-0, the engine's own state dicts. Every
rank then fills its new engine from those files (`load_portable`): its slice of each tensor (its experts
under expert parallelism, its partition under ZeRO) goes into the parameters, the fp32 master weights
and the AdamW moments through DeepSpeed's `safe_set_full_*` API (ZeRO 1-3) or the torch optimizer's
state (ZeRO-0). Files are read with `mmap`, so a rank touches only the bytes it keeps.

Over 250 lines because converting and loading are the two halves of one file format, kept side by side.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from model.distributed import deepspeed_checkpoint_globals, zero_stage

LAYOUT_FILE = "layout.json"
LAYOUT_KEYS = ("world_size", "expert_parallel_size", "zero_stage")  # what may change on resume
FIXED_KEYS = ("global_batch_size", "lora")                             # what may not
MOMENTS = ("exp_avg", "exp_avg_sq")


def inner_optimizer(engine):
    """The torch optimizer under DeepSpeed's ZeRO wrapper (ZeRO-0: the engine's optimizer itself)."""
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def zero0_masters(engine) -> dict[int, torch.Tensor]:
    """bf16/fp16 ZeRO-0: DeepSpeed's `FP16_UnfusedOptimizer` steps fp32 master copies of the module's 16-bit
    parameters; {id(module parameter): its master}. Empty for every other engine."""
    opt = engine.optimizer
    if engine.zero_optimization_stage() != 0 or not hasattr(opt, "fp32_groups") or not hasattr(opt, "fp16_groups"):
        return {}
    return {id(p16): p32 for g16, g32 in zip(opt.fp16_groups, opt.fp32_groups) for p16, p32 in zip(g16, g32)}


def layout_record(cfg, world: int, stage: int) -> dict:
    """What a checkpoint's files depend on (saved beside them), and what must not change on resume."""
    return {"world_size": world, "expert_parallel_size": cfg.expert_parallel_size, "zero_stage": stage,
            "global_batch_size": cfg.global_batch_size, "lora": bool(cfg.lora.enabled)}


def checkpoint_record(engine, cfg, world: int, step: int) -> dict:
    """`layout.json` of a checkpoint: its layout, the step, how many optimizer and LR-schedule steps were
    taken (the two differ from `step` when non-finite steps were skipped), and for ZeRO-0 the names of
    the optimizer's parameters in its state-dict order (ZeRO-1/2/3 checkpoints name them themselves)."""
    opt = inner_optimizer(engine)
    steps = [s["step"] for s in opt.state.values() if "step" in s]
    record = {**layout_record(cfg, world, engine.zero_optimization_stage()), "step": step,
              "optimizer_steps": int(steps[0]) if steps else 0,
              "scheduler_steps": int(engine.lr_scheduler.last_epoch)}
    names = {id(p): n for n, p in engine.module.named_parameters()}
    names |= {id(master): names[module_param] for module_param, master in zero0_masters(engine).items()}
    params = [p for g in opt.param_groups for p in g["params"]]
    if engine.zero_optimization_stage() == 0 and all(id(p) in names for p in params):
        record["optimizer_params"] = [names[id(p)] for p in params]
    return record


def describe(layout: dict) -> str:
    return f"{layout['world_size']} rank(s), EP {layout['expert_parallel_size']}, ZeRO-{layout['zero_stage']}"


def changed(saved: dict, now: dict) -> list[str]:
    """The keys that may not change and did (empty: the resume can go ahead)."""
    return [k for k in FIXED_KEYS if saved[k] != now[k]]


# ---------------------------------------------------------------------------------------------
# writing the portable checkpoint (rank 0)

def canonical_name(name: str) -> str:
    """A parameter's name in the model without expert parallelism (AutoEP's w1/w3 map onto halves of
    gate_up_proj, handled by the callers)."""
    for ep, canon in ((".mlp.experts.w2", ".mlp.experts.down_proj"), (".mlp.router.gate.weight", ".mlp.gate.weight"),
                      (".mlp.gate.gate.weight", ".mlp.gate.weight"),
                      (".mlp.gate.modules_to_save.default.weight", ".mlp.gate.weight")):  # LoRA's trained router
        if name.endswith(ep):
            return name[: -len(ep)] + canon
    return name


def write_portable(source: Path, out: Path, log: Path) -> None:
    """Convert checkpoint folder `source` (any layout) into the portable folder `out`; see the module doc."""
    layout = json.loads((source / LAYOUT_FILE).read_text())
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    if layout["zero_stage"] == 0 and not any(source.glob("*optim_states.pt")):  # (bf16 ZeRO-0 has its own files)
        tensors = _from_zero0(source, layout)
    else:
        tensors = _from_universal(source, partial / "universal", log)
    for name, state in tensors:
        torch.save({k: v.detach().reshape(-1).contiguous() for k, v in state.items()}, partial / f"{name}.pt")
    shutil.rmtree(partial / "universal", ignore_errors=True)
    (partial / LAYOUT_FILE).write_text(json.dumps(layout))
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)


def _from_zero0(source: Path, layout: dict):
    """(name, state) from a ZeRO-0 checkpoint: the module's state dict and the torch optimizer's (bf16/fp16:
    the fp32 masters and the torch optimizer's state inside DeepSpeed's `FP16_UnfusedOptimizer` state)."""
    with torch.serialization.safe_globals(deepspeed_checkpoint_globals()):
        sd = torch.load(source / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True, mmap=True)
    optimizer, masters = sd["optimizer"], None
    if "optimizer_state_dict" in optimizer:  # 16-bit: masters in the torch optimizer's parameter order
        masters = [t for group in optimizer["fp32_groups"] for t in group]
        optimizer = optimizer["optimizer_state_dict"]
    order = [i for g in optimizer["param_groups"] for i in g["params"]]
    for j, (index, name) in enumerate(zip(order, layout["optimizer_params"])):
        state = optimizer["state"].get(index, {})
        fp32 = masters[j] if masters is not None else sd["module"][name]
        yield canonical_name(name), {"fp32": fp32, **{k: state[k] for k in MOMENTS if k in state}}


def _from_universal(source: Path, universal: Path, log: Path):
    """(name, state) from DeepSpeed's universal conversion of a ZeRO-1/2/3 checkpoint. Its files hold a
    tensor (ZeRO-3, flattened) or {"param": tensor, ...} (ZeRO-1/2, and AutoEP's experts [E, ...])."""
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(source),
           "--output_folder", str(universal), "--inject_missing_state", "--num_extract_workers", "1",
           "--num_merge_workers", "1"]
    with open(log, "a") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise RuntimeError(f"converting {source} to DeepSpeed's universal format failed: {' '.join(cmd)} "
                           f"(output in {log})")

    def read(folder: Path) -> dict:
        out = {}
        for key in ("fp32", *MOMENTS):
            if (folder / f"{key}.pt").is_file():
                x = torch.load(folder / f"{key}.pt", map_location="cpu", weights_only=True)
                out[key] = x["param"] if isinstance(x, dict) else x
        return out

    zero = universal / "zero"
    for folder in sorted(zero.iterdir()):
        name = folder.name
        if name.endswith(".mlp.gate.gate.weight"):
            continue  # AutoEP's second handle on the router weight (mlp.router.gate.weight), without optimizer state
        if name.endswith(".mlp.experts.w3"):
            continue  # joined with w1 below
        if name.endswith(".mlp.experts.w1"):
            w1, w3 = read(folder), read(folder.with_name(name[:-2] + "w3"))
            yield name[:-2] + "gate_up_proj", {k: torch.cat([w1[k], w3[k]], dim=1) for k in w1}
            continue
        yield canonical_name(name), read(folder)


# ---------------------------------------------------------------------------------------------
# reading it into a new engine (every rank)

def load_portable(engine, folder: Path, model_config, ep_size: int, ep_rank: int) -> dict:
    """Fill `engine` (any ZeRO stage, any EP size) from portable checkpoint `folder`: parameters, fp32
    master weights, AdamW moments and step counts, LR schedule position. Returns the folder's layout
    record (with "step")."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    layout = json.loads((folder / LAYOUT_FILE).read_text())
    stage, opt = engine.zero_optimization_stage(), inner_optimizer(engine)
    E, I, H = model_config.num_local_experts, model_config.intermediate_size, model_config.hidden_size
    local = slice(ep_rank * E // ep_size, (ep_rank + 1) * E // ep_size)
    if isinstance(opt, torch.optim.Adam | torch.optim.AdamW):
        # torch creates AdamW's state at the first step, DeepSpeed links its fragments to it after: do both now
        # (ZeRO-3 puts its flat fp32 partitions into the param groups only while stepping them)
        flats = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None) or [
            p for g in opt.param_groups for p in g["params"]]
        for flat in flats:
            state = opt.state[flat]
            state.setdefault("step", _step_tensor(opt, flat, layout["optimizer_steps"]))
            for key in MOMENTS:
                state.setdefault(key, torch.zeros_like(flat))
        if hasattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state"):
            engine.optimizer._lazy_init_hp_params_optimizer_state()
    missing, masters = [], zero0_masters(engine)
    for name, p in engine.module.named_parameters():
        if not p.requires_grad:
            continue
        canon = name[:-2] + "gate_up_proj" if name.endswith((".mlp.experts.w1", ".mlp.experts.w3")) else canonical_name(name)
        path = folder / f"{canon}.pt"
        if not path.is_file():
            missing.append(name)
            continue
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        values = {k: _local_piece(name, v, E, I, H, local).contiguous().to(torch.float32) for k, v in saved.items()}
        if not hasattr(p, "ds_id") and not hasattr(p, "_hp_mapping"):  # a torch optimizer (ZeRO-0)
            target = masters.get(id(p), p)  # 16-bit: the fp32 master is what the optimizer steps
            target.data.copy_(values["fp32"].view_as(p))
            p.data.copy_(target.data)
            state = opt.state[target]
            for key in MOMENTS:
                if key in values:
                    state[key] = values[key].view_as(p).to(target.dtype).clone()
        else:
            full = values["fp32"].view(-1)
            safe_set_full_fp32_param(p, full)
            for key in MOMENTS:
                if key in values:
                    safe_set_full_optimizer_state(p, values[key].view(-1), key)
    if missing:
        raise RuntimeError(f"the portable checkpoint {folder} has no state for {len(missing)} trainable parameter(s) "
                           f"of this model, e.g. {missing[:3]}: was it written by another model or LoRA setting?")
    if stage == 3:  # the fp32 partitions into the parameters' own (bf16 or shared fp32) partitions
        for i in range(len(engine.optimizer.fp16_groups)):
            engine.optimizer._reassign_or_swap_out_partitioned_parameters(i)
    elif hasattr(engine.optimizer, "update_lp_params"):  # ZeRO-1/2: the fp32 partitions into the model's weights
        engine.optimizer.update_lp_params()
    if inner_optimizer(engine) is not engine.optimizer:
        # each (sub-)group's own step tensor: a shared one would be counted once per group by fused AdamW
        for state in opt.state.values():
            if "step" in state:
                state["step"] = torch.full_like(state["step"], layout["optimizer_steps"]) if torch.is_tensor(
                    state["step"]) else layout["optimizer_steps"]
    set_schedule(engine.lr_scheduler, layout["scheduler_steps"])
    engine.global_steps = layout["step"]
    engine.global_samples = layout["step"] * layout["global_batch_size"]
    return layout


def _local_piece(name: str, flat: torch.Tensor, E: int, I: int, H: int, local: slice) -> torch.Tensor:
    """This rank's part of a portable tensor for parameter `name`: under AutoEP its experts `local` of
    gate_up_proj [E, 2I, H] (w1: the first I rows, w3: the last) or down_proj [E, H, I] (w2); else all of it."""
    if name.endswith(".mlp.experts.w1"):
        return flat.view(E, 2 * I, H)[local, :I]
    if name.endswith(".mlp.experts.w3"):
        return flat.view(E, 2 * I, H)[local, I:]
    if name.endswith(".mlp.experts.w2"):
        return flat.view(E, H, I)[local]
    return flat


def _step_tensor(opt, p: torch.Tensor, steps: int):
    """AdamW's `step` as torch creates it for this optimizer (a float32 tensor; on the device if fused)."""
    fused = any(g.get("fused") for g in opt.param_groups)
    return torch.tensor(float(steps), dtype=torch.float32, device=p.device if fused else "cpu")


def set_schedule(scheduler, steps: int) -> None:
    """Put a `LambdaLR` at `steps` with this run's schedule: the LR every group uses for the next step. (A portable
    checkpoint's new layout may have another number of parameter groups, so the old state dict does not fit; a
    same-layout resume loads the old groups' LR, the *old* schedule's next rate, which a changed max_steps moved.)"""
    scheduler.last_epoch = steps
    scheduler._step_count = steps + 1
    lrs = [base * fn(steps) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs


def portable_dir(ckpt: Path, tag: Path) -> Path:
    return ckpt / "portable" / tag.name


def prepare(cfg, run, ds: dict, ckpt: Path, tags: list[Path], refuse) -> Path | None:
    """Before `deepspeed.initialize`: if the newest checkpoint was written under another layout, convert
    it (rank 0, once) and return the portable folder to load after the engine is built; None when the
    layout is the same (DeepSpeed loads its own files). `refuse(message)` exits with a config error."""
    if not tags or not (tags[-1] / LAYOUT_FILE).is_file():
        return None
    saved, now = json.loads((tags[-1] / LAYOUT_FILE).read_text()), layout_record(cfg, run.world, zero_stage(ds))
    if all(saved[k] == now[k] for k in LAYOUT_KEYS):
        return None
    for key in changed(saved, now):
        refuse(f"resume=true: {tags[-1]} was written with {key}={saved[key]}, this run has {now[key]}; only the "
               f"world size, expert_parallel_size and the ZeRO stage may change on resume")
    if saved["lora"] and saved["expert_parallel_size"] > 1 and cfg.model.quantize == "none":
        refuse(f"resume=true: {tags[-1]} was written by LoRA under expert parallelism ({describe(saved)}); DeepSpeed's "
               f"universal-checkpoint conversion cannot read its frozen expert-parallel experts, so it resumes on that "
               f"layout only (QLoRA's 4-bit experts are not in its checkpoints: those resume on any layout)")
    if "optimizer_steps" not in saved:
        refuse(f"resume=true: {tags[-1]} was written on {describe(saved)} by a version that did not record its "
               f"optimizer's step count; resume it on that layout")
    portable = portable_dir(ckpt, tags[-1])
    if run.main and not (portable / LAYOUT_FILE).is_file():
        write_portable(tags[-1], portable, run.out / "build.log")
    run.barrier()
    run.print(f"[{cfg.stage}] resume: {tags[-1].name} was written on {describe(saved)}; this run has "
              f"{describe(now)}: converted to a portable checkpoint ({portable}) and loaded from it")
    return portable
