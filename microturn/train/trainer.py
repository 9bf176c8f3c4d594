"""A training step on the engine's model: loss from full-sequence log-probabilities, AdamW,
gradient clipping, and checkpoints (model and optimizer state) in one safetensors file."""

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from microturn.errors import MicroturnError
from microturn.frontend.embedding import FrontEnd
from microturn.model.decoder import Decoder
from microturn.train.batch import TimelineBatch
from microturn.train.logprobs import sequence_logprobs
from microturn.train.optimizer_state import load_optimizer, optimizer_tensors


@dataclass(frozen=True)
class TrainConfig:
    lr: float = 1e-5
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    deterministic: bool = True  # the forward the sampler ran (bitwise on-policy)


@dataclass(frozen=True)
class StepResult:
    loss: float
    grad_norm: float  # before clipping
    tokens: int  # tokens in the loss


class Trainer:
    """`frontend`: the audio/video input stage, trained (and checkpointed) with the model."""

    def __init__(self, model: Decoder, config: TrainConfig | None = None,
                 frontend: FrontEnd | None = None):
        self.model, self.config, self.frontend = model, config or TrainConfig(), frontend
        for p in self._parameters():
            p.requires_grad_(True)
        self.optimizer = torch.optim.AdamW(self._parameters(), lr=self.config.lr,
                                           weight_decay=self.config.weight_decay)
        self.steps = 0

    def loss(self, batch: TimelineBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean negative log-likelihood over the masked tokens, and all log-probabilities."""
        logprobs = sequence_logprobs(self.model, batch.token_ids, self.config.deterministic,
                                     self.frontend, batch.audio, batch.patches, batch.windows)
        mask = batch.loss_mask.to(logprobs.device)
        if not mask.any():
            raise MicroturnError("training batch: no token is selected for the loss")
        return -(logprobs * mask).sum() / mask.sum(), logprobs

    def step(self, batch: TimelineBatch) -> StepResult:
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss, _ = self.loss(batch)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self._parameters(), self.config.max_grad_norm)
        self.optimizer.step()
        self.steps += 1
        return StepResult(float(loss.detach()), float(norm), int(batch.loss_mask.sum()))

    # -- checkpoints ----------------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        tensors = {f"model.{k}": v for k, v in self._own_tensors().items()}
        optimizer, param_groups = optimizer_tensors(self.optimizer)
        tensors |= optimizer
        metadata = {"steps": str(self.steps), "config": json.dumps(asdict(self.config)),
                    "param_groups": param_groups}
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(path), metadata)

    def load(self, path: str | Path) -> None:
        try:
            tensors = load_file(str(path))
        except Exception as exc:
            raise MicroturnError(f"{path}: not a readable safetensors checkpoint ({exc})") from exc
        own = self._own_tensors()
        missing = [k for k in own if f"model.{k}" not in tensors]
        if missing:
            raise MicroturnError(f"{path}: checkpoint lacks {len(missing)} model tensors, "
                                 f"e.g. {missing[0]}")
        with torch.no_grad():
            for name, tensor in own.items():
                tensor.copy_(tensors[f"model.{name}"])
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            metadata = f.metadata()
        load_optimizer(self.optimizer, tensors, metadata["param_groups"])
        self.steps = int(metadata["steps"])

    def _parameters(self) -> list[torch.nn.Parameter]:
        return list(self.model.parameters()) + (
            list(self.frontend.parameters()) if self.frontend is not None else [])

    def _own_tensors(self) -> dict[str, torch.Tensor]:
        """Parameters by name, each storage once (a tied output head is the embedding)."""
        seen, out = set(), {}
        named = list(self.model.named_parameters(remove_duplicate=False))
        if self.frontend is not None:
            named += [(f"frontend.{n}", p) for n, p in self.frontend.named_parameters()]
        for name, p in named:
            if p.data_ptr() not in seen:
                seen.add(p.data_ptr())
                out[name] = p
        return out
