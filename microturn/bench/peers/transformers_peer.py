"""Hugging Face transformers on the same GGUF: one forward per slice onto the session's
DynamicCache (kept between micro-turns), logits for the last token only, then greedy decode."""

from pathlib import Path

import torch

from microturn.bench.peers.base import PeerUnavailable


class TransformersPeer:
    def __init__(self, gguf: Path, dtype: torch.dtype):
        try:
            import transformers
        except ImportError:
            raise PeerUnavailable("transformers is not installed (pip install "
                                  "'microturn[bench]')") from None
        self.transformers = transformers
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        short = str(dtype)[6:]
        self.name = f"transformers-{'bf16' if dtype == torch.bfloat16 else 'fp32'}"
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=dtype).eval()
        self.config = (f"transformers {transformers.__version__}, {short}, DynamicCache per "
                       "session, logits_to_keep=1, sessions served one after another "
                       f"({torch.get_num_threads()} torch threads)")

    def open(self) -> dict:
        return {"cache": self.transformers.DynamicCache(), "pending": []}

    @torch.inference_mode()
    def turn(self, sessions: list, inputs: list[list[int]], output_tokens: int) -> None:
        for session, new in zip(sessions, inputs, strict=True):
            ids = session["pending"] + new
            for _ in range(output_tokens):
                out = self.model(input_ids=torch.tensor([ids]), past_key_values=session["cache"],
                                 use_cache=True, logits_to_keep=1)
                ids = [int(out.logits[0, -1].float().argmax())]
            session["pending"] = ids  # the last output token goes in with the next input

    def resident_bytes(self, session: dict) -> int:
        cache = session["cache"]
        return sum(t.numel() * t.element_size() for layer in cache.layers
                   for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
                   if isinstance(t, torch.Tensor))

    def close(self, session: dict) -> None:
        session.clear()
