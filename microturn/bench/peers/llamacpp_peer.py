"""llama.cpp through llama-cpp-python on the same GGUF (its own quantized weights): one context
per session with its KV kept between micro-turns, the same thread count as the others.

A context holds at most the trained context (llama.cpp refuses more). A session that fills it
gets llama.cpp's context shift, the policy of its own `main`/server: keep the first SINK
tokens, drop the oldest quarter after them, shift the rest down (its K cache is re-rotated)."""

from pathlib import Path

import numpy as np

from microturn.bench.peers.base import PeerUnavailable

SINK = 64  # tokens kept at the start (microturn's engine keeps the same sink)


def shift_drop(length: int, incoming: int, context: int) -> int:
    """llama.cpp's context shift: how many tokens after the sink to drop so that `incoming`
    more fit in `context` (at least a quarter of it at once); 0 when they fit already."""
    if length + incoming <= context:
        return 0
    return max(length + incoming - context, context // 4)


class LlamaCppPeer:
    name = "llamacpp-sequential"

    def __init__(self, gguf: Path, context: int, trained_context: int, threads: int,
                 kv_bytes_per_token: int):
        try:
            import llama_cpp
        except ImportError:
            raise PeerUnavailable("llama-cpp-python is not installed (pip install "
                                  "'microturn[bench]'; it compiles llama.cpp, ~7 min)") from None
        context = min(context, trained_context)
        self.llama_cpp, self.gguf, self.context = llama_cpp, gguf, context
        self.threads, self.bytes_per_token = threads, kv_bytes_per_token
        self.config = (f"llama-cpp-python {llama_cpp.__version__}, GGUF weights as stored "
                       f"(Q4_1/Q8_0), f16 KV, one context per session (n_ctx {context}, "
                       f"context shift when full), "
                       f"{self.threads} threads, sessions served one after another")

    def open(self) -> dict:
        llm = self.llama_cpp.Llama(model_path=str(self.gguf), n_ctx=self.context,
                                   n_batch=512, n_threads=self.threads,
                                   n_threads_batch=self.threads, logits_all=False,
                                   verbose=False)
        return {"llm": llm, "pending": []}

    def turn(self, sessions: list, inputs: list[list[int]], output_tokens: int) -> None:
        for session, new in zip(sessions, inputs, strict=True):
            llm, ids = session["llm"], session["pending"] + new
            # the logits row is llama.cpp's vocabulary wide: not the shared config's, which
            # grows when the microturn engine adds its markers (reading past the row once fed
            # llama.cpp an out-of-range token: llama_decode returned -1)
            vocab = llm.n_vocab()
            for _ in range(output_tokens):
                self._make_room(llm, len(ids))
                llm.eval(ids)  # logits of the last token only (no logits_all)
                row = self.llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
                ids = [int(np.argmax(np.ctypeslib.as_array(row, shape=(vocab,))))]
            session["pending"] = ids

    def _make_room(self, llm, incoming: int) -> None:
        """Context shift: keep SINK tokens, drop at least a quarter of the context after them,
        move the rest down by as many positions."""
        if not (drop := shift_drop(llm.n_tokens, incoming, self.context)):
            return
        lib, memory = self.llama_cpp, self.llama_cpp.llama_get_memory(llm._ctx.ctx)
        lib.llama_memory_seq_rm(memory, 0, SINK, SINK + drop)
        lib.llama_memory_seq_add(memory, 0, SINK + drop, llm.n_tokens, -drop)
        kept = llm.input_ids[SINK + drop:llm.n_tokens].copy()
        llm.input_ids[SINK:SINK + len(kept)] = kept
        llm.n_tokens -= drop

    def resident_bytes(self, session: dict) -> int:
        return self.context * self.bytes_per_token  # llama.cpp allocates n_ctx slots at once

    def close(self, session: dict) -> None:
        session["llm"].close()
        session.clear()
