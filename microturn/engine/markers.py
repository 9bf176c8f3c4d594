"""The four marker tokens of the micro-turn timeline, found in the checkpoint or added to it,
and the input-only media tokens of audio and video segments (`MediaTokens`).

Each marker is looked up by a list of candidate spellings in the checkpoint's own vocabulary
(SmolLM2 has `<|im_end|>`, which an instruct model already emits to end a reply, and
`<empty_output>`). A marker with no candidate present is added as a new special token.

Initialisation of an added token's embedding row (documented, deterministic): the mean of the
existing rows plus Gaussian noise with 2 % of the rows' per-dimension standard deviation, from
a generator seeded with 0. The mean keeps the new row inside the distribution the first layer
has seen; the noise keeps two added markers distinguishable. With tied embeddings the output
head grows with it, so the model can also emit the marker.
"""

import dataclasses
from dataclasses import dataclass
from functools import cached_property

import torch
from tokenizers import AddedToken

from microturn.checkpoint.loader import LoadedModel
from microturn.model.linear import Embedding, Linear

CANDIDATES = {
    "input_start": ("<|in|>",),
    "output_start": ("<|out|>",),
    "silence": ("<|silence|>", "<empty_output>"),
    "end_of_slice": ("<|end_of_slice|>", "<|im_end|>"),
}
NOISE_FRACTION = 0.02


@dataclass(frozen=True)
class MediaTokens:
    """Input-only tokens of the audio and video segments, with ids past the vocabulary
    (`base` = its size): the front-end embeds them and the output head never sees them, so
    adding media changes nothing for text. Five markers with a learned row each, then two
    placeholders whose vector is the data at that position (a dMel frame, a patch)."""
    base: int

    num_markers = 5  # audio_start, video_start, frame_start, row_end, absent

    @property
    def audio_start(self) -> int:  # opens the audio segment of an input slice
        return self.base

    @property
    def video_start(self) -> int:  # opens the video segment
        return self.base + 1

    @property
    def frame_start(self) -> int:  # opens one frame of the video segment
        return self.base + 2

    @property
    def row_end(self) -> int:  # closes one row of a frame's patches
        return self.base + 3

    @property
    def absent(self) -> int:  # the segment's modality carried nothing this slice
        return self.base + 4

    @property
    def audio_frame(self) -> int:  # placeholder: one dMel frame
        return self.base + 5

    @property
    def patch(self) -> int:  # placeholder: one 40x40 patch
        return self.base + 6


@dataclass(frozen=True)
class MarkerTokens:
    input_start: int  # opens input slice k
    output_start: int  # opens output slice k: the model speaks after it
    silence: int  # an input slice with nothing in it; or the model choosing to stay silent
    end_of_slice: int  # the model ends its output slice early
    added: tuple[str, ...] = ()  # markers that were not in the checkpoint's vocabulary
    vocab_size: int = 0  # the model's vocabulary with the markers: media ids start here

    @cached_property
    def media(self) -> MediaTokens:
        return MediaTokens(self.vocab_size)

    def ends_output(self, token: int) -> bool:
        return token in (self.silence, self.end_of_slice)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"added": list(self.added)}

    @classmethod
    def from_dict(cls, data: dict) -> "MarkerTokens":
        return cls(**(data | {"added": tuple(data.get("added", ()))}))


def install_markers(loaded: LoadedModel) -> MarkerTokens:
    """Resolve the markers, adding missing ones to tokenizer, embedding and config (once per
    loaded model: a second engine on the same model gets the same record)."""
    if isinstance(loaded.markers, MarkerTokens):
        return loaded.markers
    tokenizer = loaded.tokenizer
    ids, missing = {}, []
    for name, spellings in CANDIDATES.items():
        found = next((i for s in spellings if (i := tokenizer.token_id(s)) is not None), None)
        if found is None:
            missing.append(name)
        ids[name] = found
    if missing:
        model_vocab = loaded.config.vocab_size
        if tokenizer.vocab_size != model_vocab:
            raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens, model {model_vocab}")
        texts = [CANDIDATES[name][0] for name in missing]
        tokenizer.backend.add_special_tokens(
            [AddedToken(t, special=True, normalized=False) for t in texts])
        for name, text in zip(missing, texts, strict=True):
            ids[name] = tokenizer.token_id(text)
            tokenizer.special_ids.add(ids[name])
        grow_vocabulary(loaded, len(missing))
    loaded.markers = MarkerTokens(**ids, added=tuple(missing),
                                  vocab_size=loaded.config.vocab_size)
    return loaded.markers


def grow_vocabulary(loaded: LoadedModel, extra: int) -> None:
    model, config = loaded.model, loaded.config
    old = model.embed_tokens.weight.detach()
    rows = old.float()
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(extra, rows.shape[1], generator=generator) * rows.std(0) * NOISE_FRACTION
    new_rows = (rows.mean(0) + noise).to(old.dtype).to(old.device)
    embed = Embedding(config.vocab_size + extra, config.hidden_size, device=old.device,
                      dtype=old.dtype)
    embed.weight.data = torch.cat([old, new_rows])
    embed.requires_grad_(False)
    model.embed_tokens = embed
    if config.tie_word_embeddings:
        model.lm_head.weight = embed.weight
    else:
        head = Linear(config.hidden_size, config.vocab_size + extra, bias=False,
                      device=old.device, dtype=old.dtype)
        head.weight.data = torch.cat([model.lm_head.weight.detach(), new_rows])
        model.lm_head = head.requires_grad_(False)
    loaded.config = dataclasses.replace(config, vocab_size=config.vocab_size + extra)
    model.config = loaded.config
