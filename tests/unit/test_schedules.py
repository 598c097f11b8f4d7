"""Learning-rate schedules (train/model_setup.py `lr_lambda`) at every step of short and long runs, against
their formulas and, after warmup, transformers' own schedules; no rate is ever negative, past the end included."""

import math

import pytest
import torch
from omegaconf import OmegaConf

from train.model_setup import lr_lambda

CASES = [(0, 1), (0, 5), (1, 3), (2, 5), (3, 10), (5, 6), (100, 1000), (0, 3000)]  # (warmup W, total T)


def _cfg(schedule, warmup, total, floor=0.1, decay_fraction=0.2):
    return OmegaConf.create({"max_steps": total, "optim": {"warmup_steps": warmup, "schedule": schedule,
                                                           "min_lr_ratio": floor, "decay_fraction": decay_fraction}})


def _formula(schedule, k, W, T, m, frac=0.2):
    """The docstring's formulas, written out again."""
    if k < W:
        return (k + 1) / W
    p = min(1.0, max(0.0, (k - W) / max(1, T - W)))
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return m + (1 - m) * (1 - p)
    if schedule == "cosine":
        return m + (1 - m) * 0.5 * (1 + math.cos(math.pi * p))
    D = max(1, round(frac * (T - W)))
    return m + (1 - m) * min(1.0, max(0.0, (T - 1 - k) / D))


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine", "wsd"])
@pytest.mark.parametrize("warmup, total", CASES)
def test_every_step_follows_the_formula_and_is_never_negative(schedule, warmup, total):
    f = lr_lambda(_cfg(schedule, warmup, total))
    for k in range(total + 20):  # past the end too: a resume with a lower max_steps
        assert f(k) == pytest.approx(_formula(schedule, k, warmup, total, 0.1), abs=1e-12), (k, f(k))
        assert min(0.1, 1 / max(1, warmup)) - 1e-12 <= f(k) <= 1.0, (k, f(k))
    if warmup:
        assert f(0) == 1 / warmup and f(warmup - 1) == 1.0  # warmup's first update is not at rate 0
    if schedule == "wsd":
        assert f(total - 1) == pytest.approx(0.1)  # the last applied update reaches the floor, not the one after


@pytest.mark.parametrize("warmup, total", [(c) for c in CASES if c[1] > c[0]])
def test_after_warmup_cosine_and_linear_equal_transformers(warmup, total):
    from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup, get_linear_schedule_with_warmup

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    hf_cos = get_cosine_with_min_lr_schedule_with_warmup(opt, warmup, total, min_lr_rate=0.1).lr_lambdas[0]
    hf_lin = get_linear_schedule_with_warmup(opt, warmup, total).lr_lambdas[0]
    cos, lin = lr_lambda(_cfg("cosine", warmup, total)), lr_lambda(_cfg("linear", warmup, total, floor=0.0))
    for k in range(warmup, total):
        assert cos(k) == pytest.approx(hf_cos(k), abs=1e-12)
        assert lin(k) == pytest.approx(hf_lin(k), abs=1e-12)
