"""A training run's checkpoint file: trainable weights, optimizer state and the run's own
metadata (step, config, history) in one safetensors file, shared by `microturn train` and
`microturn train --rl`."""

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from microturn.errors import MicroturnError
from microturn.train.optimizer_state import load_optimizer, optimizer_tensors


def write_checkpoint(path: Path, params: dict[str, torch.nn.Parameter],
                     optimizer: torch.optim.Optimizer, metadata: dict[str, str]) -> None:
    """Written beside and renamed, so an interrupted save leaves the last checkpoint whole."""
    tensors = {f"param.{n}": p.detach().contiguous() for n, p in params.items()}
    state, param_groups = optimizer_tensors(optimizer)
    partial = path.with_suffix(".partial")
    save_file(tensors | state, str(partial), metadata | {"param_groups": param_groups})
    partial.replace(path)


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            return tensors, f.metadata()
    except Exception as error:
        raise MicroturnError(f"{path}: not a readable checkpoint ({error})") from None


def restore(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
            params: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer) -> None:
    """The weights and optimizer state of `read_checkpoint` into the run (its config already
    checked against the file's by the caller)."""
    with torch.no_grad():
        for name, p in params.items():
            if f"param.{name}" not in tensors:
                raise MicroturnError(f"{path}: checkpoint lacks {name}")
            p.copy_(tensors[f"param.{name}"])
    load_optimizer(optimizer, tensors, metadata["param_groups"])
