"""Structured schemas of the evaluation commands (Hydra); unknown keys and wrong types fail at start-up."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


@dataclass
class PasskeyConfig:
    model_path: str = MISSING
    output_dir: str = "outputs/passkey"
    lengths: Optional[list[int]] = None     # context lengths in tokens; default: powers of 2 up to max positions
    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    trials: int = 5
    mode: str = "completion"                # completion (base models) | chat ([INST], chat models)
    seed: int = 0
    batch_size: int = 8
    max_new_tokens: int = 10
    dtype: str = "auto"


@dataclass
class JudgeConfig:
    base_url: Optional[str] = None          # OpenAI-compatible endpoint, e.g. https://api.openai.com/v1
    model: str = "gpt-4"
    api_key_env: str = "OPENAI_API_KEY"     # name of the environment variable holding the key
    max_tokens: int = 2048
    temperature: float = 0.0
    retries: int = 5
    timeout_s: float = 120.0
    concurrency: int = 4


@dataclass
class MTBenchConfig:
    model_path: str = MISSING
    model_id: str = MISSING
    output_dir: str = "outputs/mt_bench"
    questions: str = "question.jsonl"       # FastChat question file (../shared/data/mt_bench/question.jsonl)
    judge_prompts: Optional[str] = None     # default: judge_prompts.jsonl beside `questions`
    reference_answers: Optional[str] = None  # default: reference_answer/gpt-4.jsonl beside `questions`
    max_new_tokens: int = 1024
    batch_size: int = 8
    limit: Optional[int] = None             # first N questions (smoke runs)
    seed: int = 0
    dtype: str = "auto"
    judge: JudgeConfig = field(default_factory=JudgeConfig)


@dataclass
class ServeConfig:
    model_path: str = MISSING
    model_id: Optional[str] = None          # name reported by /v1/models (default: folder name)
    host: str = "127.0.0.1"                 # loopback unless told otherwise
    port: int = 8000
    max_new_tokens: int = 512
    dtype: str = "auto"


@dataclass
class RoutingConfig:
    model_path: str = MISSING
    output_dir: str = "outputs/routing"
    data: dict[str, str] = field(default_factory=dict)  # subset name → text file/jsonl; empty: built-in subsets
    max_tokens: int = 4096                  # per subset
    seq_len: int = 512
    dtype: str = "auto"


@dataclass
class ChatConfig:
    model_path: str = MISSING
    system: Optional[str] = None
    max_new_tokens: int = 512
    temperature: float = 0.7
    dtype: str = "auto"


cs = ConfigStore.instance()
for _name, _node in (("passkey_schema", PasskeyConfig), ("mt_bench_schema", MTBenchConfig), ("serve_schema", ServeConfig),
                     ("routing_schema", RoutingConfig), ("chat_schema", ChatConfig)):
    cs.store(name=_name, node=_node)
