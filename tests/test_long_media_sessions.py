"""Long media sessions: old slices' media positions are evicted before their text
(`sequence/residency.py`). The engine compacts, the export records it, the trainer replays it
bit for bit, a resumed session replays it too; a forged compaction is refused or caught."""

import copy
import json

import pytest
import torch
from test_engine import tiny_loaded

from microturn.checkpoint.loader import load_tokenizer
from microturn.engine.engine import Engine, EngineConfig
from microturn.engine.session import SessionParams, params_from_export
from microturn.errors import MicroturnError
from microturn.sequence.residency import Eviction, Residency, replay
from microturn.sequence.timeline import Timeline
from microturn.train.alignment import verify_alignment
from microturn.train.batch import resident_windows
from microturn.train.logprobs import sequence_logprobs

SLICES = 48


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def loaded(request):
    return tiny_loaded(load_tokenizer(), dtype=request.param)


def config(**changes) -> EngineConfig:
    return EngineConfig(**({"kv_budget_mb": 32, "block_size": 16, "context_limit": 256,
                            "sink_tokens": 16, "deterministic": True, "keep_logits": True,
                            "resume_chunk": 64} | changes))


def voice(engine: Engine, sid: int, first: int, last: int) -> None:
    """Slices first..last-1 of a voice session: 16 dMel frames each, a word every third."""
    for k in range(first, last):
        codes = torch.randint(0, 16, engine.layout(sid).audio_shape, dtype=torch.uint8,
                              generator=torch.Generator().manual_seed(k))
        engine.append(sid, [300 + k, 301] if k % 3 == 0 else [], codes)
        engine.tick()


def session(engine: Engine) -> int:
    return engine.open(SessionParams(max_output_tokens=3, audio=True, force_output=True))


def test_media_goes_first_and_the_trainer_replays_it_bitwise(loaded):
    engine = Engine(loaded, config())
    sid = session(engine)
    voice(engine, sid, 0, SLICES)
    info = engine.session_info(sid)
    export = json.loads(json.dumps(engine.close(sid)))
    tokens = Timeline.from_export(export).tokens()
    vocab = loaded.markers.vocab_size
    records = [Eviction.from_dict(e) for e in export["evictions"]]
    replay(records, 16, 16, tokens, vocab)  # checks every record: text kept, whole blocks
    residency, compactions = Residency(16, 16), []  # (each compaction, its region's start)
    for e in records:
        if e.kept:
            compactions.append((e, residency.raw_start))
        residency.apply(e)
    assert len(compactions) >= 2 and len(tokens) > 4 * 256  # the policy really ran
    assert any(not e.kept for e in records[records.index(compactions[0][0]):])  # and drops
    # text reaches further back than media, and every text token since then is resident
    assert info.text_since < info.media_since - 64 and info.kv_slots <= 256

    report = verify_alignment(export, loaded.model, engine.frontend)
    assert report.aligned and report.skipped == 0
    assert report.compared == sum(v is not None for v in export["logprobs"][1:]) > 200
    # what the replay means, checked apart from the kernel: the masked torch formula gives
    # the same numbers to rounding (bf16 rounds more)
    windows = resident_windows([export])
    timeline = Timeline.from_export(export)
    audio, _ = timeline.media()
    masked = sequence_logprobs(loaded.model, torch.tensor([tokens]), False, engine.frontend,
                               audio, None, windows)[0]
    sampled = export["logprobs"][1:]
    close = [abs(float(m) - s) for m, s in zip(masked, sampled, strict=True) if s is not None]
    assert max(close) < (0.05 if loaded.model.dtype == torch.bfloat16 else 1e-3)

    # negative controls: the same slots kept from the oldest media instead of the newest
    # (a record the checks accept) gives other numbers; a compaction that drops text is
    # refused
    forged = copy.deepcopy(export)
    e, raw_start = compactions[0]
    kept = [t for first, n in e.kept for t in range(first, first + n)]
    media = [t for t in range(raw_start, raw_start + e.slots) if tokens[t] >= vocab]
    filler = [t for t in kept if tokens[t] >= vocab]
    assert filler and media[:len(filler)] != filler  # the newest media filled the blocks
    swapped = sorted([t for t in kept if tokens[t] < vocab] + media[:len(filler)])
    record = forged["evictions"][records.index(e)]
    record["kept"] = [[t, 1] for t in swapped]
    assert verify_alignment(forged, loaded.model, engine.frontend).first_mismatch is not None
    text = next(t for t in kept if tokens[t] < vocab)
    record["kept"] = [[t, 1] for t in sorted(set(swapped) - {text} | {media[len(filler)]})]
    with pytest.raises(ValueError, match="drops text"):
        verify_alignment(forged, loaded.model, engine.frontend)


def test_without_compaction_media_and_text_go_together(loaded):
    engine = Engine(loaded, config(compact_media=False))
    sid = session(engine)
    voice(engine, sid, 0, SLICES)
    info = engine.session_info(sid)
    export = engine.close(sid)
    assert export["evictions"] and not any(e.get("kept") for e in export["evictions"])
    assert info.text_since == info.media_since
    assert verify_alignment(export, loaded.model, engine.frontend).aligned


def test_a_resumed_media_session_replays_its_compactions(loaded):
    original = Engine(loaded, config())
    sid = session(original)
    voice(original, sid, 0, 30)
    midway = original.export(sid)
    voice(original, sid, 30, SLICES)
    whole = original.close(sid)
    assert any(e.get("kept") for e in midway["evictions"])
    elsewhere = Engine(loaded, config())
    resumed = elsewhere.open(params_from_export(midway), from_export=midway)
    while elsewhere.resuming(resumed):
        elsewhere.tick()
    voice(elsewhere, resumed, 30, SLICES)
    again = elsewhere.close(resumed)
    assert again["evictions"] == whole["evictions"]
    assert again["logprobs"] == whole["logprobs"]
    forged = copy.deepcopy(midway)  # a compaction that keeps too little is refused at open
    e = next(e for e in forged["evictions"] if e.get("kept"))
    e["kept"] = e["kept"][1:]
    with pytest.raises(MicroturnError, match="from_export: evictions"):
        elsewhere.open(params_from_export(forged), from_export=forged)
