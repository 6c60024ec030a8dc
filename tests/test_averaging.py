"""Weight averaging (finetune.ema_decay): the EMA follows its closed form, and the fine-tune validates and saves the
average, not the last step's weights."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from pipeline.core.averaging import WeightAverage


def test_ema_matches_the_closed_form():
    """After steps with weights w_1..w_n: ema = d^n w_0 + sum_k (1-d) d^(n-k) w_k, for parameters and float buffers;
    integer buffers are copied."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    decay = 0.9
    history = [{k: v.clone() for k, v in net.state_dict().items()}]
    avg = WeightAverage(net, decay)
    for _ in range(5):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        net.train()(torch.randn(4, 3))  # moves the BatchNorm running statistics and num_batches_tracked
        history.append({k: v.clone() for k, v in net.state_dict().items()})
        avg.update(net)
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
        WeightAverage(nn.Linear(2, 2), decay)
