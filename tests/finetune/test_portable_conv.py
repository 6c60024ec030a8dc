"""pipeline/core/finetune/portable_conv.py: the portable backward equals PyTorch's own gradients (within float32 rounding)
for every convolution geometry a backbone uses, and the mode leaves everything that needs no gradient alone."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.core.finetune.portable_conv import PortableConvolutions, conv2d_backward, training_convolutions
from pipeline.infra import numerics

# (in channels, out channels, kernel, stride, padding, groups, input size): the stem (3x3 s2, padding 0 after
# timm's own "same" pad), pointwise, depthwise 3x3 and 5x5 at strides 1 and 2, a grouped ResNeXt-style
# convolution, PyTorch's padding="same", and a patch embedding (ViT's 16x16 stride 16)
GEOMETRIES = [
    (3, 16, 3, 2, 0, 1, 17), (24, 8, 1, 1, 0, 1, 9), (12, 12, 3, 1, 1, 12, 9), (12, 12, 5, 2, 0, 12, 11),
    (12, 12, 5, 1, 2, 12, 7), (8, 12, 3, 1, 1, 2, 6), (6, 6, 3, 1, "same", 6, 8), (4, 6, 4, 1, "same", 1, 7),
    (3, 8, 16, 16, 0, 1, 32), (8, 8, 3, 2, 1, 1, 9),
]


def _grads(x, w, b, conf, portable: bool):
    stride, padding, groups = conf
    x, w, b = (t.detach().clone().requires_grad_() for t in (x, w, b))
    with PortableConvolutions() if portable else torch.enable_grad():
        y = F.conv2d(x, w, b, stride, padding, 1, groups)
    gy = torch.linspace(-1, 1, y.numel()).reshape(y.shape).contiguous(memory_format=torch.channels_last)
    y.backward(gy)
    return y.detach(), x.grad, w.grad, b.grad


@pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel lengths:UserWarning")  # PyTorch, reference side
@pytest.mark.parametrize("cin,cout,k,stride,padding,groups,size", GEOMETRIES)
def test_gradients_equal_pytorch_within_rounding(cin, cout, k, stride, padding, groups, size):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, cin, size, size, generator=g).contiguous(memory_format=torch.channels_last)
    w = torch.randn(cout, cin // groups, k, k, generator=g) * 0.2
    b = torch.randn(cout, generator=g)
    ours = _grads(x, w, b, (stride, padding, groups), portable=True)
    theirs = _grads(x, w, b, (stride, padding, groups), portable=False)
    assert torch.equal(ours[0], theirs[0])  # the forward pass is PyTorch's own
    for name, a, e in zip(("input", "weight", "bias"), ours[1:], theirs[1:]):
        assert a.shape == e.shape, name
        scale = float(e.abs().max())
        assert torch.allclose(a, e, rtol=1e-5, atol=1e-5 * scale), (name, float((a - e).abs().max()), scale)


def test_depthwise_closed_form():
    """One channel, 2x2 input, 2x2 kernel, no padding: one output y = sum(x * w), so dy/dw = x and dy/dx = w."""
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    w = torch.tensor([[[[0.5, -1.0], [2.0, 0.25]]]])
    grad_x, grad_w = conv2d_backward(torch.ones(1, 1, 1, 1), x, w, 1, 0, 1, groups=1)
    assert torch.equal(grad_w, x) and torch.equal(grad_x, w)
    grad_x, grad_w = conv2d_backward(torch.full((1, 1, 1, 1), 2.0), x, w, 1, 0, 1, groups=1)
    assert torch.equal(grad_w, 2 * x) and torch.equal(grad_x, 2 * w)


def test_what_needs_no_gradient_keeps_pytorch_kernels():
    """Under no_grad (evaluation) and for tensors without requires_grad the mode is a pass-through: same bytes."""
    x = torch.randn(2, 4, 8, 8).contiguous(memory_format=torch.channels_last)
    w = torch.randn(4, 1, 3, 3)
    with PortableConvolutions():
        plain = F.conv2d(x, w, None, 1, 1, 1, 4)
        with torch.no_grad():
            frozen = F.conv2d(x, w.requires_grad_(), None, 1, 1, 1, 4)
    assert plain.grad_fn is None and frozen.grad_fn is None
    assert torch.equal(plain, F.conv2d(x, w.detach(), None, 1, 1, 1, 4)) and torch.equal(frozen, plain)


def test_bytes_do_not_depend_on_the_batch_split_of_threads():
    """The same call twice gives the same bytes (no atomics, no racing reductions)."""
    x = torch.randn(4, 16, 12, 12).contiguous(memory_format=torch.channels_last)
    w = torch.randn(16, 1, 5, 5)
    first, second = (_grads(x, w, torch.zeros(16), (1, 2, 16), portable=True) for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_chosen_for_cpu_fp32_under_portable_numerics_only():
    cpu = torch.device("cpu")
    portable = numerics.STATUS.get("mode") == numerics.PORTABLE and numerics.STATUS.get("baseline")
    assert isinstance(training_convolutions(cpu, "fp32"), PortableConvolutions) == bool(portable)
    assert not isinstance(training_convolutions(cpu, "bf16"), PortableConvolutions)
    assert not isinstance(training_convolutions(torch.device("cuda"), "fp32"), PortableConvolutions)
