"""The input-embedding stage: token ids, dMel codes and patch pixels -> model vectors.

The timeline's token row carries text ids below the vocabulary size and, past it, the media
tokens (`MediaTokens`): segment markers with a learned row each, and two placeholders whose
vector comes from the data at that position, in row order:

- `audio_frame` <- the sum of 80 per-channel bin embeddings of one dMel frame (`DMelEmbedding`);
- `patch` <- one 40x40 RGB patch through the hMLP stem (`HMLPStem`).

A row with no media ids never enters here, so text-only sessions run exactly as before.
Every piece is row-invariant (per-row linear kernels, ReLU, a fixed-order sum), so a
position's vector does not depend on what else is in the batch: the engine and the trainer
embed bit for bit alike.

Weights: loading finds them beside the checkpoint or draws fresh ones
(`checkpoint/interaction.py`); `FrontEnd.initialise` is the fresh draw, `save` the file.
"""

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from microturn.errors import MicroturnError
from microturn.kernels import ops
from microturn.model.linear import Linear
from microturn.sequence.markers import MediaTokens
from microturn.sequence.media_specs import DMelSpec, FrameSpec


class DMelEmbedding(nn.Module):
    """One table of `bins` rows per channel; a frame is the sum of its 80 chosen rows."""

    def __init__(self, spec: DMelSpec, width: int):
        super().__init__()
        self.spec = spec
        self.table = nn.Parameter(torch.empty(spec.channels * spec.bins, width))
        self.register_buffer("offsets", torch.arange(spec.channels) * spec.bins,
                             persistent=False)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """uint8 [frames, channels] -> [frames, width], summed in fp32 by a fixed pairwise
        tree over the channels: elementwise adds only, so no frame's sum depends on how many
        frames are in the batch (a library reduction may split differently by shape). Without
        autograd the CPU kernel sums the same tree in registers (the same bits)."""
        kernels = ops.kernels_for(self.table)
        if (kernels and codes.dtype == torch.uint8
                and not (torch.is_grad_enabled() and self.table.requires_grad)):
            return kernels.dmel_embedding(self.table, codes, self.spec.bins)
        rows = self.table[codes.long() + self.offsets].float()  # [frames, channels, width]
        while rows.shape[1] > 1:
            half = rows.shape[1] // 2
            paired = rows[:, :half] + rows[:, half:2 * half]
            rows = torch.cat([paired, rows[:, 2 * half:]], 1) if rows.shape[1] % 2 else paired
        return rows[:, 0]


class HMLPStem(nn.Module):
    """A 40x40 patch -> one vector, by three non-overlapping stages (4x4, then 2x2, then 5x5
    cells: strided convolutions whose stride equals their kernel, written as per-cell linear
    maps so they run on the row-invariant linear kernel). ReLU between stages: exact in every
    lane, unlike a vectorised GELU whose tail elements may round differently."""

    def __init__(self, spec: FrameSpec, width: int):
        super().__init__()
        if spec.patch != 40:
            raise MicroturnError(f"the hMLP stem is built for 40x40 patches, not {spec.patch}")
        hidden = max(16, width // 4)
        self.cell1 = Linear(3 * 4 * 4, hidden)
        self.cell2 = Linear(hidden * 2 * 2, hidden)
        self.cell3 = Linear(hidden * 5 * 5, width)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """uint8 [n, 3, 40, 40] -> [n, width]."""
        n, dtype = patches.shape[0], self.cell1.weight.dtype
        x = patches.to(dtype) / 255.0 - 0.5
        x = x.view(n, 3, 10, 4, 10, 4).permute(0, 2, 4, 1, 3, 5).reshape(n * 100, 48)
        x = torch.relu(self.cell1(x)).view(n, 5, 2, 5, 2, -1)
        x = x.permute(0, 1, 3, 2, 4, 5).reshape(n * 25, -1)
        x = torch.relu(self.cell2(x))  # [n * 25, hidden]: 5x5 cells of 8x8 pixels
        return self.cell3(x.reshape(n, -1))


class FrontEnd(nn.Module):
    def __init__(self, media: MediaTokens, width: int, dmel: DMelSpec | None = None,
                 frames: FrameSpec | None = None):
        super().__init__()
        self.media = media
        self.dmel_spec, self.frame_spec = dmel or DMelSpec(), frames or FrameSpec()
        self.markers = nn.Parameter(torch.empty(media.num_markers, width))
        self.audio = DMelEmbedding(self.dmel_spec, width)
        self.video = HMLPStem(self.frame_spec, width)

    def embed(self, token_embedding: nn.Embedding, token_ids: torch.Tensor,
              audio: torch.Tensor | None, patches: torch.Tensor | None) -> torch.Tensor:
        """token_ids [B, T] (media ids allowed), audio uint8 [frames, 80] and patches uint8
        [n, 3, 40, 40] in row order -> input vectors [B, T, width] in the model's dtype."""
        media = self.media
        is_media = token_ids >= media.base
        x = token_embedding(torch.where(is_media, 0, token_ids))
        flat, ids = x.view(-1, x.shape[-1]), token_ids.reshape(-1)
        if not torch.is_inference_mode_enabled() and torch.is_grad_enabled():
            flat = flat.clone()  # written in place below; keep autograd's saved copy intact
        at_markers = (is_media.reshape(-1) & (ids < media.audio_frame)).nonzero().squeeze(1)
        flat[at_markers] = self.markers[ids[at_markers] - media.base].to(x.dtype)
        for placeholder, data, stage in ((media.audio_frame, audio, self.audio),
                                         (media.patch, patches, self.video)):
            where = (ids == placeholder).nonzero().squeeze(1)
            count = 0 if data is None else data.shape[0]
            if where.numel() != count:
                raise MicroturnError(f"input embedding: {where.numel()} placeholder positions "
                                     f"for {count} items of media")
            if count:
                flat[where] = stage(data.to(x.device)).to(x.dtype)
        return flat.view_as(x)

    def initialise(self, token_embedding: torch.Tensor, seed: int = 0) -> "FrontEnd":
        """Fresh weights: marker rows and the sum of 80 dMel rows spread like token rows;
        stem layers with variance-preserving scale, its output at the token rows' spread."""
        generator = torch.Generator().manual_seed(seed)
        rows = token_embedding.detach().float()
        spread = rows.std().item()
        with torch.no_grad():
            noise = torch.randn(self.markers.shape, generator=generator)
            self.markers.copy_(rows.mean(0) + noise * spread)
            channels = self.dmel_spec.channels
            self.audio.table.copy_(torch.randn(self.audio.table.shape, generator=generator)
                                   * spread / channels ** 0.5)
            for layer in (self.video.cell1, self.video.cell2, self.video.cell3):
                scale = (2.0 / layer.weight.shape[1]) ** 0.5  # He: keeps ReLU activations' size
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * scale)
                layer.bias.zero_()
            # the stem's output on random pixels, brought to the token rows' spread
            pixels = torch.randint(0, 256, (64, 3, 40, 40), generator=generator,
                                   dtype=torch.uint8)
            out = self.video(pixels)
            self.video.cell3.weight.mul_(spread / out.float().std().item())
        return self

    def save(self, path: str | Path) -> None:
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()},
                  str(path))
