"""A checkpoint made an interaction model: the timeline's marker tokens found in its vocabulary
or added to it, and the audio/video front-end's weights loaded beside it.

Each marker is looked up by a list of candidate spellings in the checkpoint's own vocabulary
(SmolLM2 has `<|im_end|>`, which an instruct model already emits to end a reply, and
`<empty_output>`). A marker with no candidate present is added as a new special token.

Initialisation of an added token's embedding row (documented, deterministic): the mean of the
existing rows plus Gaussian noise with 2 % of the rows' per-dimension standard deviation, from
a generator seeded with 0. The mean keeps the new row inside the distribution the first layer
has seen; the noise keeps two added markers distinguishable. With tied embeddings the output
head grows with it, so the model can also emit the marker.

Front-end weights: `<checkpoint>.frontend.safetensors` next to the base checkpoint. Without
one, fresh weights are drawn from a generator seeded with 0 (scaled to the token embeddings'
spread), and `load_frontend` says so once.
"""

import dataclasses
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from tokenizers import AddedToken

from microturn.checkpoint.tokenizer import Tokenizer
from microturn.errors import MicroturnError
from microturn.frontend.embedding import FrontEnd
from microturn.model.decoder import Decoder
from microturn.model.linear import Embedding, Linear
from microturn.sequence.markers import MarkerTokens, MediaTokens

CANDIDATES = {
    "input_start": ("<|in|>",),
    "output_start": ("<|out|>",),
    "silence": ("<|silence|>", "<empty_output>"),
    "end_of_slice": ("<|end_of_slice|>", "<|im_end|>"),
}
NOISE_FRACTION = 0.02
FRONTEND_WEIGHTS_SUFFIX = ".frontend.safetensors"


def install_markers(model: Decoder, tokenizer: Tokenizer) -> MarkerTokens:
    """Resolve the markers, adding missing ones to the tokenizer, the embedding (and an untied
    output head) and `model.config`, in place."""
    ids, missing = {}, []
    for name, spellings in CANDIDATES.items():
        found = next((i for s in spellings if (i := tokenizer.token_id(s)) is not None), None)
        if found is None:
            missing.append(name)
        ids[name] = found
    if missing:
        model_vocab = model.config.vocab_size
        if tokenizer.vocab_size != model_vocab:
            raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens, model {model_vocab}")
        texts = [CANDIDATES[name][0] for name in missing]
        tokenizer.backend.add_special_tokens(
            [AddedToken(t, special=True, normalized=False) for t in texts])
        for name, text in zip(missing, texts, strict=True):
            ids[name] = tokenizer.token_id(text)
            tokenizer.special_ids.add(ids[name])
        grow_vocabulary(model, len(missing))
    digits = tuple(tokenizer.token_id(str(d)) for d in range(10))
    return MarkerTokens(**ids, added=tuple(missing), vocab_size=model.config.vocab_size,
                        digits=digits if None not in digits else ())


def grow_vocabulary(model: Decoder, extra: int) -> None:
    config = model.config
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
    model.config = dataclasses.replace(config, vocab_size=config.vocab_size + extra)


def frontend_weights_path(checkpoint: Path) -> Path:
    return checkpoint.parent / (checkpoint.name + FRONTEND_WEIGHTS_SUFFIX)


def load_frontend(model: Decoder, media: MediaTokens, path: Path | None,
                  notice: bool = True) -> FrontEnd:
    """The front-end for `model`: weights from the file at `path`, else fresh ones (seed 0),
    with a notice on stderr if asked. Reads the model's token embedding; never changes it."""
    frontend = FrontEnd(media, model.config.hidden_size)
    if path is not None and path.is_file():
        try:
            state = load_file(str(path))
        except Exception as error:  # safetensors raises its own types for a corrupt file
            raise MicroturnError(f"{path}: cannot read front-end weights ({error})") from None
        missing = set(frontend.state_dict()) ^ set(state)
        if missing:
            raise MicroturnError(f"{path}: front-end weights do not match this model "
                                 f"(mismatched tensors: {', '.join(sorted(missing))})")
        try:
            frontend.load_state_dict(state)
        except RuntimeError as error:
            raise MicroturnError(f"{path}: front-end weights do not match this model "
                                 f"({str(error).splitlines()[-1].strip()})") from None
    else:
        frontend.initialise(model.embed_tokens.weight)
        if notice:
            print(f"notice: no front-end weights at {path or '(no checkpoint path)'}; audio "
                  "and video embeddings are freshly initialised (seed 0) and untrained",
                  file=sys.stderr)
    return frontend.to(device=model.device, dtype=model.dtype).requires_grad_(False)
