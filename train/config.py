"""Structured (dataclass) schemas for the stage and pipeline configs, and `compose`.

Every primary config (`configs/{pretrain,sft,dpo}.yaml`) starts from one of the schemas
registered here, so OmegaConf rejects an unknown key (`optim.lrr=1`) or a wrong type
(`max_steps=abc`) at composition, naming the key. The cross-key rules Hydra cannot express
are train/checks.py.

Over 250 lines because each key is declared once here with its comment: this file is the reference of
every option.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the key."""


class Choice(str, Enum):
    """The values a choice key allows. OmegaConf refuses any other at composition (`precision=bf17` names the key
    and the choices); in code a value is a `str` that compares, hashes and prints as itself (`cfg.precision ==
    "bf16"`). `OmegaConf.to_container(..., enum_to_str=True)` where plain data leaves the config."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


def choice(name: str, values: str, module: str = __name__) -> type[Choice]:
    """A `Choice` named `name` (defined in `module`) whose values are the words of `values`."""
    return Choice(name, [(v, v) for v in values.split()], module=module, qualname=name)


AttnImplementation = choice("AttnImplementation", "packed_sdpa sdpa eager flash_attention_2 flex_attention")
ExpertsImplementation = choice("ExpertsImplementation", "sorted_grouped_mm grouped_mm batched_mm eager")
Quantize = choice("Quantize", "none nf4")
OptimName = choice("OptimName", "adamw sgd")
Schedule = choice("Schedule", "cosine linear constant wsd")
DataFormat = choice("DataFormat", "auto text messages alpaca sharegpt preference hh_rlhf unpaired")
Overlong = choice("Overlong", "truncate drop")
OnError = choice("OnError", "raise skip")
LoggingBackend = choice("LoggingBackend", "none wandb")
WandbMode = choice("WandbMode", "offline online disabled")
LossType = choice("LossType", "sigmoid ipo hinge robust kto orpo simpo")
ReferenceMode = choice("ReferenceMode", "precomputed live adapters_off")
Precision = choice("Precision", "auto fp32 bf16 fp16")


@dataclass
class ModelConfig:
    """Mixtral architecture with Hugging Face's key names, plus how to build it."""
    name: str = MISSING               # preset name (configs/model/<name>.yaml)
    # The tokenizer when model_path has no tokenizer.model of its own: a file, or the name of one shipped in
    # mistral-common (v1 "tokenizer.model.v1", v3 "mistral_instruct_tokenizer_240323.model.v3"); null: v1.
    # Its version (v1 / v3 chats) is read from the file (data/tokenizer.py).
    tokenizer: Optional[str] = None   # tokenizer file when model_path has none (null: v1)
    vocab_size: int = 32000           # embedding rows; at least the tokenizer's pieces (v1 32000, v3 32768)
    hidden_size: int = MISSING        # model width
    intermediate_size: int = MISSING  # each expert's FFN width
    num_hidden_layers: int = MISSING  # decoder layers
    num_attention_heads: int = MISSING  # query heads
    num_key_value_heads: int = MISSING  # key/value heads (grouped-query attention)
    head_dim: Optional[int] = None    # null: hidden_size / num_attention_heads
    num_local_experts: int = 8        # experts per MoE layer (Mixtral: 8)
    num_experts_per_tok: int = 2      # experts routed per token (Mixtral: 2)
    max_position_embeddings: int = 32768  # context length the model is built for
    rope_theta: float = 1e6           # rotary base
    # Context extension (continued pretraining at a longer length): replace the architecture's values, a
    # model_path's config.json included (the preset's own keys above apply only without model_path).
    rope_theta_override: Optional[float] = None  # context extension: the new rotary base
    max_position_embeddings_override: Optional[int] = None  # context extension: the new context length
    rms_norm_eps: float = 1e-5        # RMSNorm epsilon
    sliding_window: Optional[int] = None  # null: full attention
    router_jitter_noise: float = 0.0  # multiplicative noise on router inputs in training (0: none)
    tie_word_embeddings: bool = False  # share the embedding and LM head
    initializer_range: float = 0.02   # std of the random init (presets trained from scratch)
    hidden_act: str = "silu"          # expert activation
    bos_token_id: int = 1             # <s>
    eos_token_id: int = 2             # </s>
    attn_implementation: AttnImplementation = AttnImplementation("packed_sdpa")  # packed_sdpa (model/attention.py) | sdpa | eager | flash_attention_2 | flex_attention
    experts_implementation: ExpertsImplementation = ExpertsImplementation("sorted_grouped_mm")  # sorted_grouped_mm (model/experts.py) | grouped_mm | batched_mm | eager
    gradient_checkpointing: bool = False  # recompute each layer in backward (less memory, ~30% more compute)
    tiled_mlp_tokens: int = 0         # > 0: MoE experts run in tiles of this many tokens (model/tiled_moe.py)
    quantize: Quantize = Quantize("none")  # none | nf4: attention and expert weights in 4 bits (QLoRA, model/quantize.py)


@dataclass
class OptimConfig:
    name: OptimName = OptimName("adamw")  # adamw | sgd (plain SGD: debugging, gradient-scale checks)
    lr: float = 3e-4                  # peak learning rate
    weight_decay: float = 0.0         # AdamW decoupled weight decay
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # AdamW betas
    eps: float = 1e-8                 # AdamW epsilon
    warmup_steps: int = 0             # linear warmup from lr/warmup_steps (train/model_setup.py lr_lambda)
    schedule: Schedule = Schedule("cosine")  # cosine | linear | constant | wsd (constant, then linear over decay_fraction)
    min_lr_ratio: float = 0.1         # the schedules' floor, as a fraction of lr
    decay_fraction: float = 0.2       # wsd: the last part of the steps (after warmup) that decays to min_lr_ratio
    grad_clip: float = 1.0            # global gradient-norm clip (0: off)


@dataclass
class RouterConfig:
    aux_loss_coef: float = 0.01       # Switch α on our per-layer loss (balanced = 1.0); HF c ≈ ours / top_k
    z_loss_coef: float = 0.0          # ST-MoE uses 1e-3
    global_batch: bool = False        # f_e over the global batch (micro-batches × DP ranks)


@dataclass
class DataConfig:
    path: str = "synthetic"           # file, folder, hub dataset name, or "synthetic" (project-generated)
    format: DataFormat = DataFormat("auto")  # auto|text|messages|alpaca|sharegpt|preference|hh_rlhf|unpaired (KTO)
    split: str = "train"              # hub dataset split
    name: Optional[str] = None        # hub dataset config name
    text_field: str = "text"          # the field holding pretraining text
    packing: bool = True              # several examples per row (position ids restart per example)
    overlong: Overlong = Overlong("truncate")  # truncate | drop
    on_error: OnError = OnError("raise")  # raise | skip
    dedup: bool = True                # drop exact duplicate records (counted, listed in skipped.jsonl)
    max_record_chars: int = 1_000_000 # a longer line/record is an error (a broken export, not a sample)
    max_samples: Optional[int] = None  # use the first N records (null: all)
    synthetic_samples: int = 2000     # records of the synthetic data (data.path=synthetic)
    synthetic_passkey_share: float = 0.1  # share of synthetic pretraining documents that are passkey documents
    synthetic_passkey_filler: int = 3     # a passkey document holds 0..this many filler units (data/synthetic.py)
    num_proc: int = 1                 # tokenization processes
    cache_dir: Optional[str] = None   # tokenization cache; default <output_dir>/cache


@dataclass
class LoggingConfig:
    backend: LoggingBackend = LoggingBackend("none")  # none | wandb
    project: str = "mixtral-tune"     # wandb project
    run_name: Optional[str] = None    # wandb run name (null: the output_dir's name)
    mode: WandbMode = WandbMode("offline")  # wandb mode: offline | online | disabled
    log_every: int = 1                # steps between console lines
    heatmap_every: int = 50           # steps between expert-load heatmaps (wandb)
    dead_expert_steps: int = 20       # warn when an expert gets no token for this many steps


@dataclass
class PlanConfig:
    enforce: bool = True              # refuse, before loading, a layout train/plan.py says does not fit a rank's memory


@dataclass
class HubConfig:
    repo_id: Optional[str] = None     # push the export (hf/) to this Hugging Face Hub repository when set
    private: bool = True              # create the Hub repository private


@dataclass
class LoraConfig:
    enabled: bool = False             # train LoRA adapters on a frozen base
    r: int = 16                       # adapter rank
    alpha: int = 32                   # adapter scale = alpha / r
    dropout: float = 0.0              # dropout on the adapters' input
    # modules that get adapters
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    experts: bool = False             # also adapt the fused expert weights (peft target_parameters)
    train_router: bool = False        # also train the router weights (not adapters)


@dataclass
class DPOConfig:
    beta: float = 0.1                 # KL strength β of the DPO loss
    loss_type: LossType = LossType("sigmoid")  # sigmoid | ipo | hinge | robust | kto (with a reference) | orpo | simpo (reference-free)
    label_smoothing: float = 0.0      # cDPO label smoothing (sigmoid loss)
    sft_weight: float = 0.0           # RPO-style NLL on chosen (ORPO: always 1, part of its loss)
    dpop_lambda: float = 0.0          # DPOP: λ·max(0, log π_ref(y_w) − log π(y_w)) taken off the margin
    simpo_gamma: float = 0.5          # SimPO's target margin γ (loss_type=simpo)
    desirable_weight: float = 1.0     # KTO's λ_D on desirable examples' losses (loss_type=kto)
    undesirable_weight: float = 1.0   # KTO's λ_U on undesirable examples' losses
    drift_every: int = 0              # routing drift without a reference pass (precomputed, orpo, simpo): one extra
                                      # reference forward every N steps (0: off; live / adapters_off: every step, free)
    drift_alarm: float = 0.0          # print an alarm when the mean router KL(policy ‖ reference) passes this (0: off)
    mask_common_suffix: bool = False  # leave the answers' shared ending (". </s>") out of both log-probs (collate)
    reference: ReferenceMode = ReferenceMode("precomputed")  # precomputed | live | adapters_off (LoRA)
    max_prompt_len: Optional[int] = None  # cut prompts to this many tokens (null: max_seq_len decides)


@dataclass
class StageConfig:
    stage: str = MISSING              # pretrain | sft | dpo: the command's (a recipe's stage: key must match it)
    output_dir: str = MISSING         # where the run writes: config.yaml, metrics.jsonl, checkpoints/, hf/
    max_steps: int = 100              # optimizer steps
    seed: int = 0                     # model init, data order, dropout
    model_path: Optional[str] = None  # an HF folder or hub name to start from (null: the preset, randomly initialised)
    model: ModelConfig = MISSING
    deepspeed: dict[str, Any] = field(default_factory=dict)  # the DeepSpeed config (group deepspeed=zero0..3)
    expert_parallel_size: int = 1     # ranks sharing each MoE layer's experts (DeepSpeed AutoEP)
    sequence_parallel_size: int = 1   # ranks sharing each row's tokens (Ulysses, model/sequence_parallel.py)
    global_batch_size: int = 8        # rows (pairs for DPO) per optimizer step, over all ranks
    micro_batch_size: int = 1         # rows per forward pass per rank (accumulation makes up the rest)
    max_seq_len: int = 512            # tokens per row
    precision: Precision = Precision("auto")  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16
    optim: OptimConfig = field(default_factory=OptimConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    checkpoint_every: int = 0         # steps between checkpoints (0: none by count); with any checkpoint, one at the end
    checkpoint_minutes: float = 30.0  # also a checkpoint when this long has passed since the last one (0: never);
                                      # Ctrl-C / SIGTERM always checkpoint before stopping (train/stops.py)
    keep_checkpoints: int = 2         # newest checkpoints kept
    resume: bool = False              # continue output_dir's run from its newest checkpoint (train/contract.py)
    export: bool = True               # write the HF folder hf/ at the end
    verify_export: bool = True        # compare the export's logits with the live model's on a probe batch
    dist_timeout_s: int = 300         # collective timeout, and how long a silent peer rank is waited for
    malloc_mmap_threshold: Optional[int] = None  # bytes: glibc gives every allocation this large its own mapping,
                                      # returned on free (null: the stages' own, 1 MiB while loading, 4 MiB under
                                      # ZeRO-3 training, 32 MiB otherwise; train/memory_log.py set_mmap_threshold)
    max_bad_steps: int = 5            # stop (after a checkpoint) when this many steps in a row are non-finite
    plan: PlanConfig = field(default_factory=PlanConfig)
    overwrite: bool = False           # start afresh in a non-empty output_dir (its tokenization cache is kept)
    hub: HubConfig = field(default_factory=HubConfig)
    recipe_name: Optional[str] = None  # set from the command line's recipe= (recorded in config.yaml)


@dataclass
class PretrainConfig(StageConfig):
    stage: str = "pretrain"


@dataclass
class SFTConfig(StageConfig):
    stage: str = "sft"


@dataclass
class DPOStageConfig(StageConfig):
    stage: str = "dpo"
    dpo: DPOConfig = field(default_factory=DPOConfig)
    allow_random_init: bool = False   # DPO a randomly initialised preset instead of a model_path (tests only)


def register_schemas() -> None:
    cs = ConfigStore.instance()
    cs.store(name="pretrain_schema", node=PretrainConfig)
    cs.store(name="sft_schema", node=SFTConfig)
    cs.store(name="dpo_schema", node=DPOStageConfig)


register_schemas()

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def compose(stage: str, overrides: list[str] | None = None):
    """Compose a stage config the way `train/<stage>.py` does, without running Hydra's app
    (for tests, the pipeline and notebooks). Raises on unknown keys or wrong types."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return hydra_compose(config_name=stage, overrides=list(overrides or []))


@dataclass
class PipelineStage:
    recipe: str = MISSING                   # recipes/pipeline/<stage>.yaml: the stage's whole configuration
    max_steps: Optional[int] = None         # None: the recipe's
    overrides: list[str] = field(default_factory=list)   # extra key=value for the stage command


@dataclass
class PipelineMTBench:
    questions: Optional[str] = None      # FastChat question.jsonl; answers are generated when set
    max_new_tokens: int = 64          # answer length
    limit: Optional[int] = None       # first N questions (null: all 80)
    judge_base_url: Optional[str] = None  # OpenAI-compatible judge endpoint (null: answers only)
    judge_model: str = "gpt-4"        # judge model name
    judge_api_key_env: str = "OPENAI_API_KEY"  # environment variable holding the judge's key


@dataclass
class PipelineConfig:
    output_dir: str = "outputs/pipeline"  # one folder per stage and evaluation
    force: bool = False                  # redo stages that already finished
    nproc: int = 2                       # torchrun --nproc_per_node for every stage
    model: str = "tiny"               # the preset trained from scratch
    seed: int = 0                     # every stage's seed
    # Each stage is its recipe under recipes/pipeline/ (what made the tiny model learn in minutes, and why, is
    # in their headers); the command line can still add `<stage>.max_steps=` or `<stage>.overrides=[...]`.
    pretrain: PipelineStage = field(default_factory=lambda: PipelineStage(recipe="pipeline/pretrain"))
    sft: PipelineStage = field(default_factory=lambda: PipelineStage(recipe="pipeline/sft"))
    dpo: PipelineStage = field(default_factory=lambda: PipelineStage(recipe="pipeline/dpo"))
    heldout: int = 100                   # held-out prompts / documents per measurement
    # held-out preference pairs: forward passes only, so many. Half are capitals over only 8 held-out
    # countries, and 50 of them measured 70% where 200 measured 84.5% (same model): the draw of countries
    heldout_pairs: int = 400
    passkey_lengths: list[int] = field(default_factory=lambda: [128, 256])  # passkey context lengths
    # passkey depths (0: start, 1: end)
    passkey_depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    passkey_trials: int = 5           # passkey trials per cell
    mt_bench: PipelineMTBench = field(default_factory=PipelineMTBench)


ConfigStore.instance().store(name="pipeline_schema", node=PipelineConfig)
