"""Structured schemas of the evaluation commands (Hydra); unknown keys and wrong types fail at start-up."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from train.config import Precision, choice

PasskeyMode = choice("PasskeyMode", "completion chat", __name__)



@dataclass
class PasskeyConfig:
    model_path: str = MISSING         # an HF folder (a stage's hf/) or hub name
    output_dir: str = "outputs/passkey"  # passkey.json, .png, .md
    lengths: Optional[list[int]] = None     # context lengths in tokens; default: powers of 2 up to max positions
    # where the key sits (0: start, 1: end)
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    trials: int = 5                   # keys per (length, depth) cell
    mode: PasskeyMode = PasskeyMode("completion")  # completion (base models) | chat ([INST], chat models)
    seed: int = 0                     # the keys drawn
    batch_size: int = 8               # prompts per forward pass
    max_new_tokens: int = 10          # answer length
    dtype: Precision = Precision("auto")  # auto | fp32 | bf16 | fp16


@dataclass
class JudgeConfig:
    base_url: Optional[str] = None          # OpenAI-compatible endpoint, e.g. https://api.openai.com/v1
    model: str = "gpt-4"              # judge model name
    api_key_env: str = "OPENAI_API_KEY"     # name of the environment variable holding the key
    max_tokens: int = 2048            # judgment length (lowered to fit a judge that reports its context)
    temperature: float = 0.0          # judge sampling temperature
    retries: int = 5                  # retries of a failed request (server errors, timeouts)
    timeout_s: float = 120.0          # per request
    concurrency: int = 4              # requests in flight


@dataclass
class MTBenchConfig:
    model_path: str = MISSING         # an HF folder (a stage's hf/) or hub name
    model_id: str = MISSING           # the answers' model name (file model_answer/<model_id>.jsonl)
    output_dir: str = "outputs/mt_bench"  # model_answer/, model_judgment/, scores
    questions: str = "question.jsonl"       # FastChat question file (../shared/data/mt_bench/question.jsonl)
    judge_prompts: Optional[str] = None     # default: judge_prompts.jsonl beside `questions`
    reference_answers: Optional[str] = None  # default: reference_answer/gpt-4.jsonl beside `questions`
    max_new_tokens: int = 1024        # answer length per turn
    batch_size: int = 8               # prompts per forward pass
    limit: Optional[int] = None             # first N questions (smoke runs)
    seed: int = 0                     # sampling seed
    dtype: Precision = Precision("auto")  # auto | fp32 | bf16 | fp16
    judge: JudgeConfig = field(default_factory=JudgeConfig)


@dataclass
class ServeConfig:
    model_path: str = MISSING         # an HF folder (a stage's hf/) or hub name
    model_id: Optional[str] = None          # name reported by /v1/models (default: folder name)
    host: str = "127.0.0.1"                 # loopback unless told otherwise
    port: int = 8000                  # TCP port (0: any free one)
    max_new_tokens: int = 512         # answer length when a request gives no max_tokens
    dtype: Precision = Precision("auto")  # auto | fp32 | bf16 | fp16


@dataclass
class RoutingConfig:
    model_path: str = MISSING         # an HF folder (a stage's hf/) or hub name
    output_dir: str = "outputs/routing"  # routing.json, heatmaps
    data: dict[str, str] = field(default_factory=dict)  # subset name → text file/jsonl; empty: built-in subsets
    max_tokens: int = 4096                  # per subset
    seq_len: int = 512                # tokens per forward pass
    dtype: Precision = Precision("auto")  # auto | fp32 | bf16 | fp16


@dataclass
class ChatConfig:
    model_path: str = MISSING         # an HF folder (a stage's hf/) or hub name
    system: Optional[str] = None      # system prompt
    max_new_tokens: int = 512         # answer length
    temperature: float = 0.7          # sampling temperature (0: greedy)
    dtype: Precision = Precision("auto")  # auto | fp32 | bf16 | fp16


cs = ConfigStore.instance()
for _name, _node in (("passkey_schema", PasskeyConfig), ("mt_bench_schema", MTBenchConfig), ("serve_schema", ServeConfig),
                     ("routing_schema", RoutingConfig), ("chat_schema", ChatConfig)):
    cs.store(name=_name, node=_node)


def _model_path(cfg) -> None:
    from omegaconf import OmegaConf

    from train.checks import looks_local
    from train.config import ConfigError

    if OmegaConf.is_missing(cfg, "model_path") or not cfg.model_path:
        raise ConfigError("model_path is required: an export folder (a stage's <output_dir>/hf) or a hub name "
                          "like mistralai/Mixtral-8x7B-Instruct-v0.1")
    path = os.path.expanduser(cfg.model_path)
    if not looks_local(cfg.model_path):
        return
    if not os.path.isdir(path):
        raise ConfigError(f"model_path={cfg.model_path}: no such folder")
    if not os.path.isfile(os.path.join(path, "config.json")):
        if os.path.isfile(os.path.join(path, "hf", "config.json")):
            raise ConfigError(f"model_path={cfg.model_path} is a run folder: its export is "
                              f"model_path={os.path.join(cfg.model_path, 'hf')}")
        raise ConfigError(f"model_path={cfg.model_path}: folder has no config.json (expected an HF model folder)")


def validate_eval(cfg) -> None:
    """The eval commands' checks Hydra cannot express, before any model loads (ConfigError names the key)."""
    from omegaconf import OmegaConf

    from train.config import ConfigError

    def positive(key):
        value = OmegaConf.select(cfg, key)
        if value is not None and value < 1:
            raise ConfigError(f"{key}={value}: must be >= 1")

    _model_path(cfg)
    for key in ("max_new_tokens", "batch_size", "trials", "limit", "max_tokens", "seq_len", "judge.concurrency",
                "judge.max_tokens"):
        if OmegaConf.select(cfg, key) is not None:
            positive(key)
    if "depths" in cfg:  # passkey
        bad = [d for d in cfg.depths if not 0.0 <= d <= 1.0]
        if bad or not cfg.depths:
            raise ConfigError(f"depths={list(cfg.depths)}: each depth is a share of the document between 0 and 1 "
                              f"(0 = the start, 1 = the end), e.g. depths=[0,0.5,1]")
        if cfg.lengths is not None and any(n < 16 for n in cfg.lengths):
            raise ConfigError(f"lengths={list(cfg.lengths)}: each context length must be >= 16 tokens")
    if "questions" in cfg:  # mt_bench
        if OmegaConf.is_missing(cfg, "model_id"):
            raise ConfigError("model_id is required: the name answers and judgments are filed under (e.g. model_id=my-sft)")
        if not os.path.isfile(cfg.questions):
            raise ConfigError(f"questions={cfg.questions}: no such file (MT-Bench's FastChat question.jsonl, e.g. "
                              f"questions=../shared/data/mt_bench/question.jsonl)")
    if "port" in cfg and not 0 < cfg.port < 65536:  # serve
        raise ConfigError(f"port={cfg.port}: expected 1-65535")
    if "temperature" in cfg and cfg.temperature < 0:  # chat
        raise ConfigError(f"temperature={cfg.temperature}: must be >= 0")
