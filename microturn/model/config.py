"""ModelConfig: the shape of a Llama/Qwen-family decoder (dense or mixture-of-experts), read
from a checkpoint."""

from dataclasses import dataclass
from typing import Literal

from microturn.errors import MicroturnError

# How rotary embedding pairs the channels of a head:
#   "half"        rotates channel i with channel i + rotary_dim/2 (Hugging Face, GGUF qwen2/qwen3)
#   "interleaved" rotates channel 2i with 2i+1 (GGUF llama: its converter permutes Q and K rows)
RopeLayout = Literal["half", "interleaved"]


@dataclass(frozen=True)
class MoEConfig:
    experts: int
    top_k: int
    expert_size: int  # each expert's intermediate size
    normalize: bool  # renormalise the top-k weights to sum to 1 (Mixtral, Qwen3-MoE)
    shared_size: int = 0  # Qwen2-MoE's shared expert (0: none)
    sparse_step: int = 1  # every sparse_step-th layer is MoE (Qwen2-MoE's decoder_sparse_step)
    dense_layers: tuple[int, ...] = ()  # layers kept dense (Qwen's mlp_only_layers)

    def is_sparse(self, layer: int) -> bool:
        return layer not in self.dense_layers and (layer + 1) % self.sparse_step == 0


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_layout: RopeLayout
    max_position: int  # trained context length; positions past it still run, quality may drop
    tie_word_embeddings: bool
    attention_bias: bool = False  # Qwen2: bias on q/k/v projections
    qk_norm: bool = False  # Qwen3: RMSNorm on each query/key head before rotary
    architecture: str = "llama"
    moe: MoEConfig | None = None  # mixture-of-experts feed-forward (`model/moe.py`)

    def __post_init__(self):
        positive = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                    "head_dim", "intermediate_size", "max_position")
        for name in positive:
            if getattr(self, name) <= 0:
                raise MicroturnError(f"model config: {name} must be > 0, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise MicroturnError(
                f"model config: num_heads ({self.num_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise MicroturnError(f"model config: head_dim must be even, got {self.head_dim}")
        if self.rope_layout not in ("half", "interleaved"):
            raise MicroturnError(f"model config: unknown rope_layout {self.rope_layout!r}")
        if not self.rope_theta > 0 or not self.rms_norm_eps > 0:
            raise MicroturnError("model config: rope_theta and rms_norm_eps must be > 0")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim
