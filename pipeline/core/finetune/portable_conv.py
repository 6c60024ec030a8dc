"""Convolutions for CPU training whose bytes do not depend on the CPU model: Intel and AMD give the same fine-tune.

Why: with the portable pins (pipeline/infra/numerics.py: AVX2 kernels, MKL's COMPATIBLE branch, 2 threads) features,
heads and the MLP's training came out byte-identical on an AMD EPYC and an Intel Xeon, but the fine-tune did not
(epoch-1 train loss 0.2733 vs 0.2797, final val accuracy 0.9721 vs 0.9666). The one part of a training step that
is neither ATen's own code, nor MKL under its portable branch, nor a forward convolution (which extraction showed
to agree) is the backward pass of oneDNN's convolutions. A weight gradient there is a sum over batch x height x
width that oneDNN splits into blocks and partial sums sized at run time from the CPU's caches (L1 48 KiB / L2 2 MiB
on the Xeon here, typically 32 KiB / 1 MiB on an EPYC), so the order of its additions, and the last bits, can
follow the CPU model whatever the instruction-set cap; a forward kernel adds each output's products in one fixed
order whatever its blocking.

So while training on a CPU under portable numerics, every 2-D convolution that needs a gradient runs through
:class:`PortableConvolutions`: the forward pass stays oneDNN's, and the backward pass is computed here from
operations whose order of addition depends only on the shapes and the pinned thread count: MKL GEMMs in its
COMPATIBLE branch (the same code on every x86-64 vendor; the MLP head's training, which is GEMMs, agreed across
vendors) for pointwise and dense convolutions, ATen's element-wise products and reductions for depthwise weight
gradients, and oneDNN forward convolutions for stride-1 depthwise input gradients. tests/finetune/test_finetune_bytes.py
checks a whole training step against a committed record, on whatever machine runs the tests. Cost: README
"Portable numerics" (bench/finetune_kernels.py).

    with PortableConvolutions():      # around the training forward pass; backward follows the recorded graph
        loss = F.cross_entropy(net(x), y)
    loss.backward()
"""
from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from pipeline.infra import numerics

_aten = torch.ops.aten


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _same_padding(x: torch.Tensor, weight: torch.Tensor, dilation: tuple[int, int]) -> tuple[torch.Tensor, tuple]:
    """`padding='same'` (stride 1) as an explicit, possibly uneven pad of `x`: PyTorch's own split (extra on the
    right/bottom)."""
    pads = []
    for dim in (1, 0):  # F.pad lists the last dimension first
        total = dilation[dim] * (weight.shape[2 + dim] - 1)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads), (0, 0)


def _geometry(x: torch.Tensor, weight: torch.Tensor) -> str:
    """Which backward this convolution gets: pointwise (1x1, a GEMM), depthwise, or dense (im2col + GEMM)."""
    cout, cin_per_group, kh, kw = weight.shape
    if cin_per_group == 1 and cout == x.shape[1]:
        return "depthwise"
    return "pointwise" if (kh, kw) == (1, 1) else "dense"


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) as (N*H*W, C): a view for channels-last tensors (the fine-tune's layout), a copy otherwise."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def _from_rows(rows: torch.Tensor, n: int, h: int, w: int) -> torch.Tensor:
    """(N*H*W, C) back to an (N, C, H, W) tensor in channels-last memory."""
    return rows.view(n, h, w, -1).permute(0, 3, 1, 2)


def _window(t: torch.Tensor, i: int, j: int, out_hw: tuple[int, int], stride, dilation) -> torch.Tensor:
    """The (N, C, Ho, Wo) view of padded `t` that kernel tap (i, j) reads."""
    top, left = i * dilation[0], j * dilation[1]
    return t[:, :, top:top + stride[0] * (out_hw[0] - 1) + 1:stride[0],
             left:left + stride[1] * (out_hw[1] - 1) + 1:stride[1]]


def _pad(x: torch.Tensor, padding: tuple[int, int]) -> torch.Tensor:
    return F.pad(x, (padding[1], padding[1], padding[0], padding[0])) if any(padding) else x


def _depthwise_backward(gy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation,
                        need_input: bool, need_weight: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Depthwise gradients. Weight: tap by tap, the product of the output gradient with the window of the input
    that the tap reads, summed over batch and space (ATen's element-wise product and reduction). Input: at stride 1,
    a forward convolution of the output gradient with the flipped kernel (oneDNN's forward kernels, as in the
    forward pass, which add each output's taps in a fixed order); at other strides, tap by tap, each product added
    into its window."""
    kh, kw = weight.shape[2:]
    out_hw = (gy.shape[2], gy.shape[3])
    xp = _pad(x, padding)
    grad_w = grad_xp = None
    if need_weight:
        grad_w = torch.empty(weight.shape[0], kh, kw, dtype=weight.dtype, device=weight.device)
        for i in range(kh):
            for j in range(kw):
                grad_w[:, i, j] = (gy * _window(xp, i, j, out_hw, stride, dilation)).sum(dim=(0, 2, 3))
        grad_w = grad_w.view_as(weight)
    if need_input and stride == (1, 1):
        reach = (dilation[0] * (kh - 1), dilation[1] * (kw - 1))
        grad_xp = _aten.convolution(gy, weight.flip(2, 3), None, (1, 1), reach, dilation, False, (0, 0),
                                    weight.shape[0])
    elif need_input:
        grad_xp = torch.zeros_like(xp, memory_format=torch.channels_last)
        taps = weight.reshape(weight.shape[0], kh * kw)
        for i in range(kh):
            for j in range(kw):
                _window(grad_xp, i, j, out_hw, stride, dilation).addcmul_(gy, taps[:, i * kw + j].view(1, -1, 1, 1))
    grad_x = None
    if need_input:
        h, w = x.shape[2:]
        grad_x = grad_xp[:, :, padding[0]:padding[0] + h, padding[1]:padding[1] + w]
    return grad_x, grad_w


def _pointwise_backward(gy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, need_input: bool,
                        need_weight: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """1x1, stride 1: the convolution is a matrix product over pixels, so both gradients are GEMMs."""
    g = _rows(gy)
    w2 = weight.reshape(weight.shape[0], weight.shape[1])
    grad_w = (g.t() @ _rows(x)).view_as(weight) if need_weight else None
    grad_x = _from_rows(g @ w2, x.shape[0], x.shape[2], x.shape[3]) if need_input else None
    return grad_x, grad_w


def _dense_backward(gy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation,
                    need_input: bool, need_weight: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Any kernel, one group: im2col (F.unfold), one GEMM per gradient, col2im (F.fold) back for the input."""
    n, cout = gy.shape[:2]
    kernel = weight.shape[2:]
    g = gy.reshape(n, cout, -1).permute(1, 0, 2).reshape(cout, -1)  # (Cout, N*L)
    w2 = weight.reshape(cout, -1)
    grad_w = grad_x = None
    if need_weight:
        cols = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)  # (N, Cin*k*k, L)
        grad_w = (g @ cols.permute(0, 2, 1).reshape(-1, cols.shape[1])).view_as(weight)
    if need_input:
        cols = (w2.t() @ g).view(w2.shape[1], n, -1).permute(1, 0, 2)  # (N, Cin*k*k, L)
        grad_x = F.fold(cols, x.shape[2:], kernel, dilation=dilation, padding=padding, stride=stride)
    return grad_x, grad_w


def conv2d_backward(gy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation, groups: int,
                    need_input: bool = True, need_weight: bool = True
                    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The input and weight gradients of `F.conv2d(x, weight, stride=..., padding=..., dilation=..., groups=...)`
    for the output gradient `gy`, by portable kernels (see the module docstring)."""
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    gy = gy.contiguous(memory_format=torch.channels_last)
    kind = _geometry(x, weight)
    if kind == "depthwise":
        return _depthwise_backward(gy, x, weight, stride, padding, dilation, need_input, need_weight)
    if groups == 1:
        if kind == "pointwise" and stride == (1, 1) and padding == (0, 0):
            return _pointwise_backward(gy, x, weight, need_input, need_weight)
        return _dense_backward(gy, x, weight, stride, padding, dilation, need_input, need_weight)
    # grouped, not depthwise (ResNeXt): each group is a dense convolution of its own channels
    parts = [_dense_backward(g, xg, wg, stride, padding, dilation, need_input, need_weight)
             for g, xg, wg in zip(gy.chunk(groups, 1), x.chunk(groups, 1), weight.chunk(groups, 0))]
    grad_x = torch.cat([p[0] for p in parts], 1) if need_input else None
    grad_w = torch.cat([p[1] for p in parts], 0) if need_weight else None
    return grad_x, grad_w


class _Conv2d(torch.autograd.Function):
    """oneDNN's forward (as in extraction), :func:`conv2d_backward` for the gradients."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):  # noqa: D102 (autograd protocol)
        ctx.save_for_backward(x, weight)
        ctx.conv = (stride, padding, dilation, groups, bias is not None)
        return _aten.convolution(x, weight, bias, stride, padding, dilation, False, (0, 0), groups)

    @staticmethod
    def backward(ctx, gy):  # noqa: D102
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups, has_bias = ctx.conv
        grad_x, grad_w = conv2d_backward(gy, x, weight, stride, padding, dilation, groups,
                                         ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        grad_b = gy.sum(dim=(0, 2, 3)) if has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None, None, None, None


class PortableConvolutions(TorchFunctionMode):
    """Within this context, every `F.conv2d` / `torch.conv2d` that needs a gradient runs through :class:`_Conv2d`.

    A torch function mode rather than swapped modules, so it covers every backbone family (timm's `Conv2dSame`
    calls F.conv2d after its own padding, torchvision's layers call it directly) with no change to the model. A
    convolution with no gradient to compute (the frozen stem's input, evaluation under `torch.no_grad()`) keeps
    PyTorch's own kernels.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.conv2d or func is torch.conv2d:
            return _conv2d(*args, **kwargs)
        return func(*args, **kwargs)


def _conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride=1, padding=0,
            dilation=1, groups: int = 1) -> torch.Tensor:
    """F.conv2d's signature, routed through :class:`_Conv2d` where a gradient is needed."""
    if not torch.is_grad_enabled() or not (x.requires_grad or weight.requires_grad) or x.dim() != 4 \
            or x.dtype != torch.float32 or x.device.type != "cpu":
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    dilation = _pair(dilation)
    if isinstance(padding, str) and _pair(stride) != (1, 1):  # PyTorch's own error for 'same' with a stride
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    if isinstance(padding, str):
        if padding == "same":
            x, padding = _same_padding(x, weight, dilation)
        else:  # 'valid'
            padding = (0, 0)
    return _Conv2d.apply(x, weight, bias, _pair(stride), _pair(padding), dilation, groups)


def training_convolutions(device: torch.device, precision: str = "fp32") -> contextlib.AbstractContextManager:
    """The context the fine-tune's forward pass runs in: :class:`PortableConvolutions` for fp32 training on a CPU
    under portable numerics (the default), PyTorch's own kernels otherwise (GPUs, bf16, `PIPELINE_NUMERICS=native`,
    or a CPU where the pin could not be honoured: its bytes are this machine's anyway)."""
    status = numerics.STATUS or numerics.pin()
    if device.type == "cpu" and precision == "fp32" and status.get("mode") == numerics.PORTABLE \
            and status.get("baseline"):
        return PortableConvolutions()
    return contextlib.nullcontext()
