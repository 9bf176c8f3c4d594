"""Tokenizer: a `tokenizers` BPE built from a GGUF's own vocabulary, or a tokenizer.json.

Also holds the special token ids, the chat template, and incremental detokenisation for
streaming output (a token may end in the middle of a UTF-8 character).
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.decoders import DecodeStream

from microturn.errors import MicroturnError

GPT2_SPLIT = (r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+")
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre -> regex splits applied before byte-level mapping (llama.cpp's table)
PRE_TOKENIZER_SPLITS = {
    "default": [GPT2_SPLIT], "gpt-2": [GPT2_SPLIT],
    "smollm": [r"\p{N}", GPT2_SPLIT], "starcoder": [r"\p{N}", GPT2_SPLIT],
    "llama-bpe": [LLAMA3_SPLIT], "llama3": [LLAMA3_SPLIT],
    "qwen2": [QWEN2_SPLIT],
}
TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED = 3, 4


@dataclass
class Tokenizer:
    backend: HFTokenizer
    bos_id: int | None
    eos_ids: set[int]
    chat_template: str | None
    special_ids: set[int] = field(default_factory=set)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special)

    def token_id(self, text: str) -> int | None:
        return self.backend.token_to_id(text)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise MicroturnError("this checkpoint has no chat template: run without --chat")
        env = jinja2.Environment(undefined=jinja2.StrictUndefined, trim_blocks=True,
                                 lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_template_error
        bos = self.backend.id_to_token(self.bos_id) if self.bos_id is not None else ""
        eos = self.backend.id_to_token(min(self.eos_ids)) if self.eos_ids else ""
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=bos, eos_token=eos)


def _raise_template_error(message: str):
    raise MicroturnError(f"chat template: {message}")


class StreamingDecoder:
    """Turns tokens into text as they arrive, holding back an incomplete UTF-8 character
    (`tokenizers`' own `DecodeStream`: each step decodes only the tokens since the last text
    it emitted, so a long session costs O(1) per token, not O(tokens so far))."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._stream = DecodeStream(skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        return self._stream.step(self.tokenizer.backend, token_id) or ""

    def push_all(self, token_ids: list[int]) -> str:
        return "".join(self.push(t) for t in token_ids)


def tokenizer_from_gguf(fields: dict, path: Path) -> Tokenizer:
    """Build the tokenizer from GGUF metadata (tokenizer.ggml.*): vocabulary, merges, types."""
    kind = fields.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise MicroturnError(f"{path}: tokenizer model {kind!r} is not supported yet "
                             "(supported: gpt2-style byte-level BPE)")
    tokens: list[str] = fields["tokenizer.ggml.tokens"]
    types: list[int] = fields.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in fields.get("tokenizer.ggml.merges", [])]
    backend = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                     fuse_unk=False, byte_fallback=False))
    pre = fields.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZER_SPLITS:  # a wrong split gives wrong tokens without a word
        raise MicroturnError(f"{path}: tokenizer.ggml.pre {pre!r} is not supported "
                             f"(supported: {', '.join(sorted(PRE_TOKENIZER_SPLITS))})")
    splits = PRE_TOKENIZER_SPLITS[pre]
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    control = [tokens[i] for i, t in enumerate(types) if t == TOKEN_TYPE_CONTROL]
    user = [tokens[i] for i, t in enumerate(types) if t == TOKEN_TYPE_USER_DEFINED]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
    eos = fields.get("tokenizer.ggml.eos_token_id")
    eot = fields.get("tokenizer.ggml.eot_token_id")
    return Tokenizer(
        backend=backend,
        bos_id=fields.get("tokenizer.ggml.bos_token_id"),
        eos_ids={int(i) for i in (eos, eot) if i is not None},
        chat_template=fields.get("tokenizer.chat_template"),
        special_ids={i for i, t in enumerate(types) if t == TOKEN_TYPE_CONTROL},
    )


def tokenizer_from_directory(directory: Path, config: dict) -> Tokenizer:
    """tokenizer.json plus tokenizer_config.json of a Hugging Face model directory."""
    path = directory / "tokenizer.json"
    if not path.is_file():
        raise MicroturnError(f"{path}: no such file (a safetensors model needs its tokenizer.json)")
    try:
        backend = HFTokenizer.from_file(str(path))
    except Exception as exc:
        raise MicroturnError(f"{path}: not a readable tokenizer ({exc})") from None
    settings_path = directory / "tokenizer_config.json"
    settings = json.loads(settings_path.read_text()) if settings_path.is_file() else {}

    def token_of(value) -> int | None:
        text = value.get("content") if isinstance(value, dict) else value
        return backend.token_to_id(text) if text else None

    eos = config.get("eos_token_id")
    eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if (settings_eos := token_of(settings.get("eos_token"))) is not None:
        eos_ids.add(settings_eos)
    bos = config.get("bos_token_id", token_of(settings.get("bos_token")))
    specials = {tok.content for tok in backend.get_added_tokens_decoder().values() if tok.special}
    return Tokenizer(backend=backend, bos_id=bos, eos_ids=eos_ids,
                     chat_template=settings.get("chat_template"),
                     special_ids={backend.token_to_id(t) for t in specials})
