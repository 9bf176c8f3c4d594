"""Plain autoregressive generation for one prompt: prefill once, then one token per step.

This is the `microturn generate` path; the streaming-session engine builds on the same model.
"""

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from microturn.checkpoint.loader import Checkpoint
from microturn.engine.paged_attention import PagedSequence
from microturn.errors import MicroturnError
from microturn.sampling import SamplingParams, sample


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        steps = self.generated_tokens - 1  # the first token comes out of the prefill
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds > 0 else 0.0


@torch.inference_mode()
def generate_tokens(loaded: Checkpoint, prompt_ids: list[int], max_tokens: int,
                    sampling: SamplingParams | None = None,
                    stats: GenerationStats | None = None,
                    stop_at_eos: bool = True) -> Iterator[int]:
    """Yield up to max_tokens new token ids, stopping after an end-of-sequence token."""
    if not prompt_ids:
        raise MicroturnError("prompt: it encodes to zero tokens; give some text")
    if max_tokens < 0:
        raise MicroturnError(f"max_tokens must be >= 0, got {max_tokens}")
    stats = stats if stats is not None else GenerationStats()
    sampling = sampling or SamplingParams()
    model = loaded.model
    cache = PagedSequence(loaded.config, len(prompt_ids) + max_tokens, model.dtype,
                          model.device)
    generator = torch.Generator(device=model.device).manual_seed(sampling.seed)
    tokens = torch.tensor([prompt_ids], device=model.device)
    positions = torch.arange(len(prompt_ids), device=model.device).unsqueeze(0)
    last = torch.tensor([-1], device=model.device)
    stats.prompt_tokens = len(prompt_ids)
    started = time.perf_counter()
    for step in range(max_tokens):
        logits = model(tokens, positions, cache, logits_at=last)
        token = sample(logits[0, -1], sampling, generator)
        now = time.perf_counter()
        if step == 0:
            stats.prefill_seconds = now - started
        else:
            stats.decode_seconds = now - started - stats.prefill_seconds
        stats.generated_tokens += 1
        yield token
        if stop_at_eos and token in loaded.tokenizer.eos_ids:
            return
        tokens = torch.tensor([[token]], device=model.device)
        positions = torch.tensor([[len(prompt_ids) + step]], device=model.device)
