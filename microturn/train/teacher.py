"""The teacher: what a reply says, as the base model answers the same words turn-based.

Training timelines take their timing from the scenario and their content from here, so the
fine-tuned model keeps the base model's knowledge and voice: only *when* it speaks is new.
Answers are greedy (the same prompt always gets the same reply) and cached, in memory and
optionally in a JSON file, because a data pool asks the same prompts many times and a reply
costs ~1 s of decoding on a small CPU.
"""

import json
from collections.abc import Callable
from pathlib import Path

from microturn.checkpoint.loader import LoadedModel
from microturn.generate import generate_tokens
from microturn.sampling import SamplingParams

# prompt (what the user said) -> reply text
Teacher = Callable[[str], str]


class ChatTeacher:
    """The model's chat-template answer to a prompt. Call it while the model still holds its
    base weights (before an adapter is installed or a full fine-tune starts)."""

    def __init__(self, loaded: LoadedModel, max_tokens: int = 64,
                 cache_path: str | Path | None = None):
        self.loaded, self.max_tokens = loaded, max_tokens
        self.cache_path = Path(cache_path) if cache_path is not None else None
        self.cache: dict[str, str] = {}
        if self.cache_path is not None and self.cache_path.is_file():
            self.cache = json.loads(self.cache_path.read_text())

    def __call__(self, prompt: str) -> str:
        if prompt not in self.cache:
            tokenizer = self.loaded.tokenizer
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
            ids = list(generate_tokens(self.loaded, tokenizer.encode(text), self.max_tokens,
                                       SamplingParams(temperature=0.0)))
            self.cache[prompt] = tokenizer.decode(ids).strip()
        return self.cache[prompt]

    def save(self) -> None:
        if self.cache_path is not None:
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            self.cache_path.write_text(json.dumps(self.cache, indent=1, sort_keys=True))
