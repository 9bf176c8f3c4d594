"""fp32 master copies of the trainable weights that the model holds in bf16.

AdamW's step on a weight is about the learning rate; on a bf16 weight of size ~0.01 the ulp is
~6e-5, so a step under half of it rounds away and the weight never moves (the front-end's dMel
table and stem, and every weight of a bf16 full fine-tune). Here the optimizer steps an fp32
master, and the model's bf16 weight is the master rounded after each step: the forward, the
backward and what serving loads stay the same bf16 values, so trainer = sampler still holds
bit for bit, and the small steps add up in the master.

LoRA's A and B and the markers' rows are fp32 already and pass through unchanged.
"""

import torch


class MasterWeights:
    def __init__(self, params: dict[str, torch.nn.Parameter]):
        self.working = {n: p for n, p in params.items() if p.dtype != torch.float32}
        self.masters = {n: torch.nn.Parameter(p.detach().float().clone())
                        for n, p in self.working.items()}
        self.params = {n: self.masters.get(n, p) for n, p in params.items()}

    def take_grads(self) -> None:
        """After the backward: each working weight's gradient moves to its master, in fp32."""
        for name, p in self.working.items():
            master = self.masters[name]
            master.grad = None if p.grad is None else p.grad.float()
            p.grad = None

    @torch.no_grad()
    def write(self) -> None:
        """After the optimizer's step (or a restore): each working weight is its master,
        rounded to the nearest value of the working dtype."""
        for name, p in self.working.items():
            p.copy_(self.masters[name])
