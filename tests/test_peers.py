"""`microturn bench peers` on a tiny workload with the engines installed here."""

import argparse
import importlib.util
import json
import os

import pytest

from microturn.bench.peers.llamacpp_server import find_llama_server
from microturn.bench.peers.run import run_peers


def test_peer_harness_records_are_complete_and_sane(tmp_path, capsys):
    args = argparse.Namespace(
        engines="microturn,reprefill,llamacpp-batched", shapes="speech,audio", max_capacity=2,
        turns=16, input_tokens=None, output_tokens=None, slice_ms=200, capacity_turns=3,
        budget_s=120.0, dtype="bf16", model=None, json=str(tmp_path / "peers.json"),
        plot=str(tmp_path / "peers.png"), same_process=False)
    run_peers(args)
    result = json.loads((tmp_path / "peers.json").read_text())
    records = {(r["engine"], r["shape"]): r for r in result["records"]}
    engines = {"microturn", "reprefill"}
    if importlib.util.find_spec("llama_cpp") is None:  # not in CI: skipped, and said so
        assert any("llamacpp-batched: skipped" in line for line in result["skipped"])
    else:
        engines.add("llamacpp-batched")
    assert set(records) == {(e, s) for e in engines for s in ("speech", "audio")}, \
        result["skipped"]
    for (engine, shape), r in records.items():
        # each engine in a process of its own; llama.cpp's never loads torch
        assert r["process"]["pid"] != os.getpid()
        assert r["process"]["torch_imported"] == (not engine.startswith("llama"))
        # the same positions a slice for every engine: audio for microturn, text for the rest
        assert r["audio_positions"] == (17 if shape == "audio" else 0)
        assert r["turns"] == 16 and len(r["latency_ms"]) == len(r["context_tokens"]) == 16
        assert all(x > 0 for x in r["latency_ms"]) and 0 < r["p50_ms"] <= r["p99_ms"]
        assert r["tokens_per_s"] > 0 and r["capacity_sessions"] >= 0 and r["config"]
        assert r["context_tokens"] == sorted(r["context_tokens"])
    assert records["microturn", "speech"]["memory_per_session_mb"] > 0
    # re-running the history every micro-turn grows with it; resident sessions do not
    assert (records["reprefill", "speech"]["tail_head_ratio"]
            > records["microturn", "speech"]["tail_head_ratio"])
    assert (tmp_path / "peers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = capsys.readouterr().out
    assert "tail/head at common length" in table and "| microturn | speech 16/2 |" in table
    assert "| microturn | audio 16+17/2 |" in table
    assert any(line.startswith("vllm: not run") for line in result["skipped"])


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                    reason="llama-cpp-python is not installed (the bench extra)")
def test_llamacpp_context_shift_keeps_a_long_session_going(smollm_bf16):
    """A session three times its context: llama.cpp's context shift keeps it decoding."""
    from microturn.bench.peers.llamacpp_peer import SINK, LlamaCppPeer

    config = smollm_bf16.config
    peer = LlamaCppPeer(smollm_bf16.path, context=10_000, trained_context=256, threads=2,
                        kv_bytes_per_token=1)
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


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                    reason="llama-cpp-python is not installed (the bench extra)")
def test_llamacpp_batched_decodes_what_one_context_per_session_decodes(smollm_bf16):
    """Three sessions in one context, one llama_decode a token for all: each session's greedy
    tokens are those of its own context (negative control: a session fed other text
    differs), and a session past its share of the context shifts and goes on."""
    from microturn.bench.peers.llamacpp_batched import LlamaCppBatchedPeer
    from microturn.bench.peers.llamacpp_peer import LlamaCppPeer

    text = smollm_bf16.tokenizer.encode(" the quick brown fox jumps over the lazy dog, and "
                                        "then it naps in the warm afternoon sun" * 4)
    inputs = [[text[7 * s + 16 * t:7 * s + 16 * t + 16] for s in range(3)] for t in range(4)]
    batched = LlamaCppBatchedPeer(smollm_bf16.path, 512, 8192, 2, 1, 16)
    alone = LlamaCppPeer(smollm_bf16.path, 512, 8192, 2, 1)
    batched.reserve(3, 256)
    sessions = [batched.open() for _ in range(3)]
    outputs = {s: [] for s in range(3)}
    for turn in inputs:
        batched.turn(sessions, turn, 4)
        for s, session in enumerate(sessions):
            outputs[s].append(session["pending"][0])
    for s in range(3):
        own = alone.open()
        mine = []
        for turn in inputs:
            alone.turn([own], [turn[s]], 4)
            mine.append(own["pending"][0])
        alone.close(own)
        assert outputs[s] == mine, s
    assert outputs[0] != outputs[1] or outputs[1] != outputs[2]  # the control differs
    for session in sessions:
        batched.close(session)
    batched.reserve(2, 128)  # 2 x 128 tokens: 12 turns of 20 overflow the share
    sessions = [batched.open() for _ in range(2)]
    for t in range(12):
        batched.turn(sessions, [text[t:t + 16], text[t + 3:t + 19]], 4)
        assert all(s["pos"] <= 128 for s in sessions)


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None or find_llama_server() is None,
                    reason="llama-cpp-python or llama-server is not installed")
def test_llama_server_decodes_what_one_context_per_session_decodes(smollm_bf16):
    """Two sessions as two slots of one `llama-server --parallel 2`, over HTTP: each session's
    greedy tokens are those of its own llama.cpp context."""
    from microturn.bench.peers.llamacpp_peer import LlamaCppPeer
    from microturn.bench.peers.llamacpp_server import LlamaServerPeer

    text = smollm_bf16.tokenizer.encode(" a small boat drifts down the slow brown river past "
                                        "the old mill and the sleeping town" * 4)
    inputs = [[text[9 * s + 16 * t:9 * s + 16 * t + 16] for s in range(2)] for t in range(3)]
    server = LlamaServerPeer(smollm_bf16.path, 512, 8192, 2, 1)
    alone = LlamaCppPeer(smollm_bf16.path, 512, 8192, 2, 1)
    try:
        server.reserve(2, 256)
        sessions = [server.open() for _ in range(2)]
        for turn in inputs:
            server.turn(sessions, turn, 3)
        for s, session in enumerate(sessions):
            own, mine = alone.open(), []
            for turn in inputs:
                alone.turn([own], [turn[s]], 3)
                mine += [own["pending"][0]]
            alone.close(own)
            # each turn adds 16 input tokens and 3 generated ones: the turn's last is compared
            generated = [session["history"][19 * (t + 1) - 1] for t in range(len(inputs))]
            assert generated == mine, s
    finally:
        server._stop()
