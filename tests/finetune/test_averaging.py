"""Weight averaging (finetune.ema_decay, finetune.swa_start): the EMA and the tail average follow their closed forms
(the fine-tune's own test checks that the average is what is validated and saved)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from pipeline.core.finetune.averaging import ExponentialAverage, TailAverage, make_average
from pipeline.infra.config import FinetuneConfig


def _walk(net: nn.Module, average, steps: int) -> list[dict]:
    """Random steps of `net` (weights and BatchNorm statistics), `average` updated after each; the states, the
    starting one first."""
    history = [{k: v.clone() for k, v in net.state_dict().items()}]
    for _ in range(steps):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        net.train()(torch.randn(4, 3))  # moves the BatchNorm running statistics and num_batches_tracked
        history.append({k: v.clone() for k, v in net.state_dict().items()})
        average.update(net)
    return history


def test_ema_matches_the_closed_form():
    """After steps with weights w_1..w_n: ema = d^n w_0 + sum_k (1-d) d^(n-k) w_k, for parameters and float buffers;
    integer buffers are copied."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    decay = 0.9
    avg = ExponentialAverage(net, decay)
    history = _walk(net, avg, 5)
    n = len(history) - 1
    for name, value in avg.module.state_dict().items():
        if value.dtype.is_floating_point:
            expected = decay ** n * history[0][name] + sum(
                (1 - decay) * decay ** (n - k) * history[k][name] for k in range(1, n + 1))
            torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(value, history[-1][name])
    assert not any(p.requires_grad for p in avg.module.parameters())
    assert not avg.module.training


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.5])
def test_ema_rejects_a_decay_outside_0_1(decay):
    with pytest.raises(ValueError, match="EMA decay must be in"):
        ExponentialAverage(nn.Linear(2, 2), decay)


@pytest.mark.parametrize("start", [0, 3])
def test_tail_average_is_the_mean_of_the_steps_after_its_start(start):
    """After n steps from step `start` on: the plain mean of w_(start+1)..w_n (float entries; integer buffers
    copied); before that, the current weights exactly (early epochs are scored as they are)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    avg = TailAverage(net, start)
    history = _walk(net, avg, start)
    for name, value in avg.module.state_dict().items():
        assert torch.equal(value, history[-1][name])
    history += _walk(net, avg, 4)[1:]
    for name, value in avg.module.state_dict().items():
        if value.dtype.is_floating_point:
            expected = torch.stack([h[name] for h in history[start + 1:]]).mean(0)
            torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(value, history[-1][name])


def test_make_average_follows_the_config():
    net = nn.Linear(2, 2)
    assert make_average(net, FinetuneConfig(ema_decay=0.0, swa_start=0.0), 100) is None
    assert make_average(net, FinetuneConfig(ema_decay=0.99, swa_start=0.0), 100).decay == 0.99
    assert make_average(net, FinetuneConfig(ema_decay=0.0, swa_start=0.5), 101).start == 50
