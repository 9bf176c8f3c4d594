"""`microturn bench peers` on a tiny workload with the engines installed here."""

import argparse
import importlib.util
import json

import pytest

from microturn.bench.peers.run import run_peers


def test_peer_harness_records_are_complete_and_sane(tmp_path, capsys):
    args = argparse.Namespace(
        engines="microturn,reprefill,llamacpp", shapes="speech", max_capacity=2, turns=16,
        input_tokens=None, output_tokens=None, slice_ms=200, capacity_turns=3, budget_s=120.0,
        dtype="bf16", model=None, json=str(tmp_path / "peers.json"),
        plot=str(tmp_path / "peers.png"))
    run_peers(args)
    result = json.loads((tmp_path / "peers.json").read_text())
    records = {r["engine"]: r for r in result["records"]}
    if importlib.util.find_spec("llama_cpp") is None:  # not in CI: skipped, and said so
        assert set(records) == {"microturn", "reprefill"}
        assert any("llamacpp: skipped" in line for line in result["skipped"])
    else:
        assert set(records) == {"microturn", "reprefill", "llamacpp"}, result["skipped"]
    for r in records.values():
        assert r["turns"] == 16 and len(r["latency_ms"]) == len(r["context_tokens"]) == 16
        assert all(x > 0 for x in r["latency_ms"]) and 0 < r["p50_ms"] <= r["p99_ms"]
        assert r["tokens_per_s"] > 0 and r["capacity_sessions"] >= 0 and r["config"]
        assert r["context_tokens"] == sorted(r["context_tokens"])
    assert records["microturn"]["memory_per_session_mb"] > 0
    # re-running the history every micro-turn grows with it; resident sessions do not
    assert records["reprefill"]["tail_head_ratio"] > records["microturn"]["tail_head_ratio"]
    assert (tmp_path / "peers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = capsys.readouterr().out
    assert "tail/head at common length" in table and "| microturn | speech 16/2 |" in table
    assert any(line.startswith("vllm: not run") for line in result["skipped"])


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                    reason="llama-cpp-python is not installed (the bench extra)")
def test_llamacpp_context_shift_keeps_a_long_session_going(smollm_bf16):
    """A session three times its context: llama.cpp's context shift keeps it decoding."""
    import dataclasses

    from microturn.bench.peers.llamacpp_peer import SINK, LlamaCppPeer

    config = dataclasses.replace(smollm_bf16.config, max_position=256)
    peer = LlamaCppPeer(smollm_bf16.path, config, context=10_000)
    assert peer.context == 256  # never above the trained context
    session = peer.open()
    tokens = smollm_bf16.tokenizer.encode(" the quick brown fox jumps over the lazy dog" * 3)
    try:
        sink = None
        for turn in range(32):  # 32 x 24 tokens = 768
            peer.turn([session], [tokens[turn % 8:turn % 8 + 16]], 8)
            assert session["llm"].n_tokens <= 256
            if turn == 3:  # 96 tokens in, nothing shifted yet
                sink = list(session["llm"].input_ids[:SINK])
        assert list(session["llm"].input_ids[:SINK]) == sink  # the sink stays
        assert 0 <= session["pending"][0] < config.vocab_size
    finally:
        peer.close(session)
