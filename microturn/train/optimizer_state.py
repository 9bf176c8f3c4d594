"""An optimizer's state as flat safetensors entries (`optimizer.<param index>.<slot>`) plus
its param groups as JSON: the one format every training checkpoint uses."""

import json

import torch


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], str]:
    state = optimizer.state_dict()
    tensors = {f"optimizer.{index}.{key}": value.contiguous()
               for index, slots in state["state"].items() for key, value in slots.items()}
    return tensors, json.dumps(state["param_groups"])


def load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                   param_groups: str) -> None:
    slots: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, slot = key.split(".", 2)
            slots.setdefault(int(index), {})[slot] = value
    optimizer.load_state_dict({"state": slots, "param_groups": json.loads(param_groups)})
