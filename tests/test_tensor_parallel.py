"""Tensor parallelism: TP=2 and SP=2 logits are bitwise TP=1's (one device), on a tiny model
and the default model; the trainer's log-probabilities equal TP=2's; a plain all-reduce of the
ranks' partials gives other bits (negative control)."""

import pytest
import torch
from test_engine import tiny_loaded

from microturn.checkpoint.loader import load_checkpoint, load_tokenizer
from microturn.kernels import build, ops
from microturn.parallel.launch import run_ranks, tp_logits
from microturn.parallel.tensor_parallel import plan_shards
from microturn.train.logprobs import sequence_logprobs

pytestmark = pytest.mark.skipif(build.load() is None, reason="CPU kernels unavailable here")


def one_device(model, tokens):
    from microturn.model.attention_backend import CausalAttention

    with torch.no_grad():
        return model(torch.tensor([tokens]), torch.arange(len(tokens)).unsqueeze(0),
                     CausalAttention())


@pytest.fixture(scope="module")
def default_bf16(tmp_path_factory):
    model = load_checkpoint(None, torch.bfloat16, "cpu").model
    path = tmp_path_factory.mktemp("tp") / "model.pt"
    torch.save(model, path)
    return model, str(path)


def test_shards_cover_every_head_and_column_once():
    shards = plan_shards(9, 3, 1536, 2)
    assert [s.kv_heads for s in shards] == [(0, 1), (1, 3)]
    assert [s.q_heads for s in shards] == [(0, 3), (3, 9)]
    assert [s.columns for s in shards] == [(0, 768), (768, 1536)]
    with pytest.raises(Exception, match="key/value heads"):
        plan_shards(9, 3, 1536, 4)


def test_tp_and_sp_logits_equal_one_device_on_a_tiny_model(tmp_path):
    loaded = tiny_loaded(load_tokenizer(), hidden_size=128, num_heads=8, num_kv_heads=4,
                         head_dim=16, intermediate_size=256, dtype=torch.bfloat16)
    path = tmp_path / "tiny.pt"
    torch.save(loaded.model, path)
    tokens = list(range(500, 540))
    single = one_device(loaded.model, tokens)
    for world in (2, 4):
        assert torch.equal(run_ranks(world, tp_logits, str(path), tokens, "chain"), single)
    assert torch.equal(run_ranks(2, tp_logits, str(path), tokens, "chain", True), single)


def test_tp_and_sp_on_the_default_model_and_the_trainer_agree(default_bf16):
    model, path = default_bf16
    tokens = load_tokenizer().encode("The capital of France is Paris, and the capital of "
                                     "Italy is Rome. Every micro-turn counts.")
    single = one_device(model, tokens)
    tp = run_ranks(2, tp_logits, path, tokens, "chain")
    sp = run_ranks(2, tp_logits, path, tokens, "chain", True)
    assert torch.equal(tp, single) and torch.equal(sp, single)
    # the trainer (one device, autograd on) = the TP=2 pass's log-probabilities
    with torch.enable_grad():
        trainer = sequence_logprobs(model, torch.tensor([tokens]))[0].detach()
    ids = torch.tensor(tokens[1:])
    assert torch.equal(ops.token_logprobs(tp[0, :-1], ids), trainer)


def test_plain_all_reduce_gives_other_bits(default_bf16):
    """Negative control: the ranks' partials summed by torch's all-reduce."""
    model, path = default_bf16
    tokens = load_tokenizer().encode("The capital of France is Paris, and the capital of "
                                     "Italy is Rome. Every micro-turn counts.")
    plain = run_ranks(2, tp_logits, path, tokens, "all_reduce")
    assert not torch.equal(plain, one_device(model, tokens))


def test_cli_generate_tp_writes_what_one_device_writes(capfd):
    from microturn import cli

    args = ["generate", "--prompt", "The capital of France is", "--max-tokens", "6",
            "--dtype", "bf16"]
    assert cli.main(args) == 0
    single = capfd.readouterr().out
    assert cli.main(args + ["--tp", "2"]) == 0
    assert capfd.readouterr().out == single and single.strip()


def test_an_engine_on_two_ranks_streams_what_one_device_streams(tmp_path):
    """Sessions opened, fed, ticked and closed through `ReplicatedEngine` on rank 0 (rank 1
    following): every token and log-probability equals one device's engine; with a plain
    all-reduce in the shards they differ (negative control)."""
    from test_engine import tiny_loaded
    from tp_helpers import one_device, tp_engine

    loaded = tiny_loaded(load_tokenizer(), hidden_size=128, num_heads=8, num_kv_heads=4,
                         head_dim=16, intermediate_size=256, dtype=torch.bfloat16)
    path = tmp_path / "loaded.pt"
    torch.save(loaded, path)
    single = one_device(loaded)
    tp = run_ranks(2, tp_engine, str(path))
    assert [e["logprobs"] for e in tp] == [e["logprobs"] for e in single]
    assert [e["turns"] for e in tp] == [e["turns"] for e in single]
    for export in tp:  # the sampler on two ranks = the trainer on one device, bit for bit
        from microturn.train.alignment import verify_alignment

        assert verify_alignment(export, loaded.model).aligned
    plain = run_ranks(2, tp_engine, str(path), "all_reduce")
    assert [e["logprobs"] for e in plain] != [e["logprobs"] for e in single]


def _served_session(extra: list[str]) -> dict:
    """One HTTP-slice session (client clock: deterministic) on `microturn serve [extra]`;
    its export."""
    import os
    import re
    import signal
    import subprocess
    import sys

    import httpx

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    server = subprocess.Popen([sys.executable, "-m", "microturn", "serve", "--port", "0",
                               "--dtype", "bf16", "--kv-budget-mb", "64", *extra],
                              stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = next(found.group(1) for line in server.stderr
                   if (found := re.search(r"on (http://\S+) ", line)))
        with httpx.Client(base_url=url, timeout=60) as http:
            sid = http.post("/v1/sessions", json={"max_output_tokens": 3, "temperature": 0.8,
                                                  "seed": 3}).json()["session"]
            for text in ("Hello there.", "", "What is the capital", "of France?", "", ""):
                assert http.post(f"/v1/sessions/{sid}/slices",
                                 json={"text": text}).status_code == 200
            return http.delete(f"/v1/sessions/{sid}", params={"export": True}).json()["export"]
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)


def test_serve_tp_serves_what_one_process_serves():
    single = _served_session([])
    tp = _served_session(["--tp", "2"])
    assert tp["turns"] == single["turns"] and tp["logprobs"] == single["logprobs"]
