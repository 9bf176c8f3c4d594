"""llama.cpp batching every session in one context, the way `llama-server --parallel N` does:
one sequence id per session in a shared KV cache, and each micro-turn one `llama_decode`
over every session's new tokens, then one batched one-token `llama_decode` per further output
token. Through llama-cpp-python's C bindings (its high-level `Llama` holds one sequence).

The context is sized before the sessions open (`reserve`): sessions x the tokens each will
hold, never more than the trained context per session; a session that fills its share gets
the same context shift as the sequential peer (sink kept, the oldest quarter after it
dropped, the rest moved down)."""

from pathlib import Path

import numpy as np

from microturn.bench.peers.base import PeerUnavailable
from microturn.bench.peers.llamacpp_peer import SINK, shift_drop


class LlamaCppBatchedPeer:
    name = "llamacpp-batched"

    def __init__(self, gguf: Path, context: int, trained_context: int, threads: int,
                 kv_bytes_per_token: int, max_input_tokens: int):
        try:
            import llama_cpp
        except ImportError:
            raise PeerUnavailable("llama-cpp-python is not installed (pip install "
                                  "'microturn[bench]'; it compiles llama.cpp, ~7 min)") from None
        self.lib, self.threads, self.trained = llama_cpp, threads, trained_context
        self.per_session, self.max_input = min(context, trained_context), max_input_tokens
        self.bytes_per_token = kv_bytes_per_token
        llama_cpp.llama_backend_init()
        params = llama_cpp.llama_model_default_params()
        self.model = llama_cpp.llama_model_load_from_file(str(gguf).encode(), params)
        if not self.model:
            raise PeerUnavailable(f"llama.cpp could not load {gguf}")
        self.vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        self.ctx = self.batch = None
        self.free_seqs: list[int] = []
        self.config = (f"llama-cpp-python {llama_cpp.__version__}, GGUF weights as stored "
                       "(Q4_1/Q8_0), f16 KV, one context for all sessions (one sequence id "
                       "each, unified KV), one llama_decode per output token for all sessions "
                       f"(as llama-server --parallel N), {threads} threads")
        self.reserve(1, self.per_session)

    def reserve(self, sessions: int, tokens_per_session: int) -> None:
        """A fresh context for `sessions` sequences of up to `tokens_per_session` each."""
        lib = self.lib
        self._free_context()
        self.per_session = min(tokens_per_session, self.trained)
        params = lib.llama_context_default_params()
        params.n_ctx = sessions * self.per_session
        params.n_seq_max = sessions
        params.n_batch = max(512, sessions * (self.max_input + 2))
        params.n_ubatch = 512
        params.n_threads = params.n_threads_batch = self.threads
        if hasattr(params, "kv_unified"):
            params.kv_unified = True
        if hasattr(params, "flash_attn_type"):  # off, as llama-cpp-python's Llama: ~12 % faster
            params.flash_attn_type = 0           # here than "auto" (on)
        self.ctx = lib.llama_init_from_model(self.model, params)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not make a context of {params.n_ctx} tokens "
                               f"for {sessions} sequences")
        self.batch = lib.llama_batch_init(params.n_batch, 0, 1)
        self.memory = lib.llama_get_memory(self.ctx)
        self.free_seqs = list(range(sessions - 1, -1, -1))

    def open(self) -> dict:
        if not self.free_seqs:
            raise RuntimeError("llamacpp-batched: more sessions open than reserved")
        return {"seq": self.free_seqs.pop(), "pos": 0, "pending": []}

    def turn(self, sessions: list, inputs: list[list[int]], output_tokens: int) -> None:
        feeds = [s["pending"] + new for s, new in zip(sessions, inputs, strict=True)]
        for _ in range(output_tokens):
            for session, ids in zip(sessions, feeds, strict=True):
                self._make_room(session, len(ids))
            rows = self._decode(sessions, feeds)
            # the logits row is llama.cpp's vocabulary wide, not the engine's (which grows by
            # its markers)
            feeds = [[int(np.argmax(np.ctypeslib.as_array(
                self.lib.llama_get_logits_ith(self.ctx, row), shape=(self.vocab,))))]
                for row in rows]
        for session, ids in zip(sessions, feeds, strict=True):
            session["pending"] = ids

    def _decode(self, sessions: list, feeds: list[list[int]]) -> list[int]:
        """One llama_decode over every session's tokens; the batch rows that carry logits."""
        batch, n, rows = self.batch, 0, []
        for session, ids in zip(sessions, feeds, strict=True):
            for i, token in enumerate(ids):
                batch.token[n], batch.pos[n] = token, session["pos"] + i
                batch.n_seq_id[n], batch.seq_id[n][0] = 1, session["seq"]
                batch.logits[n] = i == len(ids) - 1
                n += 1
            session["pos"] += len(ids)
            rows.append(n - 1)
        batch.n_tokens = n
        status = self.lib.llama_decode(self.ctx, batch)
        if status != 0:
            raise RuntimeError(f"llama_decode returned {status} ({n} tokens, "
                               f"{len(sessions)} sequences)")
        return rows

    def _make_room(self, session: dict, incoming: int) -> None:
        seq, pos = session["seq"], session["pos"]
        if not (drop := shift_drop(pos, incoming, self.per_session)):
            return
        self.lib.llama_memory_seq_rm(self.memory, seq, SINK, SINK + drop)
        self.lib.llama_memory_seq_add(self.memory, seq, SINK + drop, pos, -drop)
        session["pos"] = pos - drop

    def resident_bytes(self, session: dict) -> int:
        return self.per_session * self.bytes_per_token  # its share of the context, allocated

    def close(self, session: dict) -> None:
        self.lib.llama_memory_seq_rm(self.memory, session["seq"], -1, -1)
        self.free_seqs.append(session["seq"])
        session.clear()

    def _free_context(self) -> None:
        if self.batch is not None:
            self.lib.llama_batch_free(self.batch)
            self.batch = None
        if self.ctx is not None:
            self.lib.llama_free(self.ctx)
            self.ctx = None

    def __del__(self):
        self._free_context()
        if getattr(self, "model", None):
            self.lib.llama_model_free(self.model)
            self.model = None

