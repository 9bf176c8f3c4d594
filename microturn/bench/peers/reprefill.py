"""The turn-based baseline: every micro-turn re-runs the whole history (no KV kept between
micro-turns) on microturn's own model and kernels, then decodes the output tokens."""

import torch

from microturn.checkpoint.loader import LoadedModel
from microturn.engine.paged_attention import PagedSequence


class ReprefillPeer:
    name = "reprefill"

    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        self.config = (f"microturn model and kernels, {str(loaded.model.dtype)[6:]}; each "
                       "micro-turn prefills the whole history into a fresh KV, then decodes")

    def open(self) -> list[int]:
        return []  # the history

    @torch.inference_mode()
    def turn(self, sessions: list, inputs: list[list[int]], output_tokens: int) -> None:
        model = self.loaded.model
        for history, new in zip(sessions, inputs, strict=True):
            history += new
            cache = PagedSequence(self.loaded.config, len(history) + output_tokens,
                                  model.dtype)
            ids, start = list(history), 0
            for _ in range(output_tokens):
                logits = model(torch.tensor([ids]), torch.arange(start, start + len(ids))[None],
                               cache, logits_at=torch.tensor([len(ids) - 1]))
                token = int(logits[0, -1].float().argmax())
                history.append(token)  # fed with the next pass (the last: next micro-turn)
                start += len(ids)
                ids = [token]

    def resident_bytes(self, session: list[int]) -> int:
        return 0  # nothing but the token ids is kept

    def close(self, session) -> None:
        session.clear()
