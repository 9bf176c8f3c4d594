"""Linear and Embedding for the decoder: no default init, and decode-shaped matmuls on CPU.

Weights always come from a checkpoint or from `init_random_weights`, so PyTorch's default init
would be wasted work (and on first use it imports torch._dynamo, ~2 s of a model load).
"""

import torch
import torch.nn.functional as F
from torch import nn

from microturn.kernels import build

# Up to this many activation rows the small-batch kernel (weights streamed once, rows reused
# from L1) beats torch here: measured on a 16-row pass, bf16 1.4x faster than widening to fp32
# for MKL, fp32 on par with MKL. Decode steps of up to 32 sessions stay on it.
SMALL_BATCH_ROWS = 32


class Linear(nn.Linear):
    def reset_parameters(self) -> None:
        pass

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernels = build.inference_kernels(x)
        if kernels and x.numel() <= SMALL_BATCH_ROWS * self.in_features:
            return kernels.small_batch_linear(x, self.weight, self.bias)
        if x.dtype == torch.bfloat16 and x.device.type == "cpu" and not build.cpu_has_bf16_gemm():
            # torch's bf16 GEMM has no fast path without bf16 hardware (~1 GFLOP/s):
            # widen to fp32 for the big matmuls of a prefill, one copy per call.
            bias = None if self.bias is None else self.bias.float()
            return F.linear(x.float(), self.weight.float(), bias).to(x.dtype)
        return F.linear(x, self.weight, self.bias)


class Embedding(nn.Embedding):
    def reset_parameters(self) -> None:
        pass
