"""Linear and Embedding that skip PyTorch's default initialisation.

Weights always come from a checkpoint or from `init_random_weights`; the default init would be
wasted work (and on first use it imports torch._dynamo, ~2 s of a model load).
"""

from torch import nn


class Linear(nn.Linear):
    def reset_parameters(self) -> None:
        pass


class Embedding(nn.Embedding):
    def reset_parameters(self) -> None:
        pass
