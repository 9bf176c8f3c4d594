"""Kernels with a backward: the forward is the batch-invariant kernel, so a training step sees
exactly the numbers the sampler saw; the backward is autograd through the plain torch
formula of the same op (gradients need not be bitwise, only right)."""

from collections.abc import Callable

import torch

from microturn.kernels import build


class KernelWithReferenceGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kernel: Callable, reference: Callable, *inputs: torch.Tensor):
        ctx.reference = reference
        ctx.save_for_backward(*inputs)
        return kernel(*inputs)

    @staticmethod
    def backward(ctx, grad):
        needs = ctx.needs_input_grad[2:]
        inputs = [t.detach().requires_grad_(need)
                  for t, need in zip(ctx.saved_tensors, needs, strict=True)]
        with torch.enable_grad():
            out = ctx.reference(*inputs)
        wanted = [t for t, need in zip(inputs, needs, strict=True) if need]
        grads = iter(torch.autograd.grad(out, wanted, grad))
        return (None, None, *(next(grads) if need else None for need in needs))


def with_reference_grad(kernel: Callable, reference: Callable, *inputs: torch.Tensor):
    return KernelWithReferenceGrad.apply(kernel, reference, *inputs)


class PackedLinear(torch.autograd.Function):
    """y = x @ W^T + b through the packed kernel; the backward is two plain matmuls (fp32)."""

    @staticmethod
    def forward(ctx, x, weight, bias, panels):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return build.load().packed_linear(x, panels, weight.shape[0], bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        g = grad.float()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (g @ weight.float()).to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = (g.flatten(0, -2).T @ x.float().flatten(0, -2)).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g.flatten(0, -2).sum(0).to(weight.dtype)
        return grad_x, grad_w, grad_b, None
