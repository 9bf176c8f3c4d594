"""Linear and Embedding for the decoder: no default init; the CPU kernels' packed weights.

Weights always come from a checkpoint or from `init_random_weights`, so PyTorch's default init
would be wasted work (and on first use it imports torch._dynamo, ~2 s of a model load).
"""

import torch
from torch import nn

from microturn.kernels import build, ops


class Linear(nn.Linear):
    _panels: torch.Tensor | None = None
    # what the panels were packed from: the weight (its id: storing a Parameter on a Module
    # would register it), its storage (.to() swaps it) and its version
    _panels_of = _panels_ptr = _panels_version = -1

    def reset_parameters(self) -> None:
        pass

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear(x, self.weight, self.bias, self.panels)

    def panels(self) -> torch.Tensor:
        """The weight packed for the CPU kernel, made on first use and again whenever the
        weight changes (replaced, or updated in place: an optimizer step bumps its version).
        It costs one more copy of the weight in memory."""
        w = self.weight
        ptr, version = w.data_ptr(), (0 if w.is_inference() else w._version)
        if (self._panels_of, self._panels_ptr, self._panels_version) != (id(w), ptr, version):
            with torch.no_grad():
                self._panels = build.load().pack_linear_weight(w.detach())
            self._panels_of, self._panels_ptr, self._panels_version = id(w), ptr, version
        return self._panels

    def keep_panels(self, panels: torch.Tensor) -> None:
        """Use `panels`, an exact copy of the current packed weight (moved to other memory)."""
        assert panels.shape == self.panels().shape and panels.dtype == self._panels.dtype
        self._panels = panels


class Embedding(nn.Embedding):
    def reset_parameters(self) -> None:
        pass
