"""Target timelines: the ideal transcript of every family passes the benchmark's own metrics,
and the export is what the engine would have recorded."""

import dataclasses

import pytest
from test_engine import tiny_loaded

from microturn import MicroturnError
from microturn.checkpoint.loader import load_tokenizer
from microturn.eval.generator import FAMILIES, generate
from microturn.eval.metrics import BACKCHANNEL_WINDOW_SLICES, says_across, score
from microturn.sequence.timeline import Timeline
from microturn.train.targets import (
    TIMED_FAMILIES,
    Target,
    TargetConfig,
    build_target,
    target_export,
    yield_slice,
)
from microturn.train.teacher import ChatTeacher


def chatty(prompt: str) -> str:
    return "Sure. Here is a **short** answer to that, in a few plain words.\n\nThanks!"


def curt(prompt: str) -> str:
    return "No."  # misses every keyword and is too short to take the turn


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def scenarios():
    return generate("train", seed=3, per_family=8)


@pytest.mark.parametrize("teacher", [chatty, curt])
def test_every_family_target_passes_the_metrics(tokenizer, scenarios, teacher):
    for delay in (0, 1):
        config = TargetConfig(reply_delay=delay)
        for sc in scenarios:
            target = build_target(sc, teacher, tokenizer, config)
            verdict = score(sc, list(target.outputs))
            assert verdict.passed, (sc.id, verdict.reason, target.outputs)
            for text, replayed, ids in zip(target.outputs, target.scripted, target.exact,
                                           strict=True):
                if ids is not None:  # an ask or a result said: exact tokens, within budget
                    assert 1 <= len(ids) <= 4 and tokenizer.decode(list(ids)) == text
                    continue
                # a slice fits the budget with its end marker, or is one word that fills it
                n = len(tokenizer.encode(" " + text))
                assert replayed or not text or n < 4 or (n == 4 and " " not in text)
    assert {sc.family for sc in scenarios} == set(FAMILIES)


def test_targets_shifted_by_three_slices_fail_time_and_cues(tokenizer, scenarios):
    """Negative control: the metrics see the timing, so a late target fails."""
    for sc in scenarios:
        if sc.family not in TIMED_FAMILIES:
            continue
        target = build_target(sc, chatty, tokenizer)
        late = ("",) * 3 + target.outputs[:-3]
        assert not score(sc, list(late)).passed, sc.id


def test_content_reply_names_the_answer_and_scripted_speech_is_kept(tokenizer, scenarios):
    for sc in scenarios:
        target = build_target(sc, curt, tokenizer)
        if sc.family == "content":
            assert says_across(target.outputs[sc.expect.turn_end:], sc.expect.answer)
            reply = " ".join(target.outputs[sc.expect.turn_end:])
            if any(target.results):  # arithmetic: asked, and the calculator's answer said
                assert "<ask>" in reply and any(target.results[sc.expect.turn_end:])
                continue
            assert reply.strip() == "No. Is there anything else?" or "The answer is" in reply
            plain = build_target(sc, curt, tokenizer, TargetConfig(checked_answers=False))
            assert "The answer is" not in " ".join(plain.outputs)  # the teacher's words only
        if sc.spoken:
            n = len(sc.spoken)
            assert target.outputs[:n] == sc.spoken and all(target.scripted[:n])
            assert not any(target.scripted[n:])
        if sc.family == "interruption":  # silent from the slice the user is first heard in
            assert target.outputs[yield_slice(sc)] == ""


def test_heldout_scenarios_never_become_training_data(tokenizer):
    sc = generate("heldout", seed=0, per_family=1, families=["time"])[0]
    with pytest.raises(MicroturnError, match="train split only"):
        build_target(sc, chatty, tokenizer)
    with pytest.raises(MicroturnError, match="reply_delay"):
        TargetConfig(reply_delay=9)


def test_export_is_the_engine_format_with_media(tokenizer, scenarios):
    loaded = tiny_loaded(tokenizer)
    markers = loaded.markers
    for family in ("cue_audio", "cue_visual", "backchannel"):
        sc = next(s for s in scenarios if s.family == family)
        target = build_target(sc, chatty, loaded.tokenizer)
        export = target_export(target, loaded.tokenizer, markers, 4)
        timeline = Timeline.from_export(export)
        assert len(timeline.turns) == sc.slices
        decoded = [loaded.tokenizer.decode(t.output_ids) for t in timeline.turns]
        assert [d.strip() for d in decoded] == [o.strip() for o in target.outputs]
        silent = [t.output_ids for t, o in zip(timeline.turns, target.outputs, strict=True)
                  if not o]
        assert all(ids == [markers.silence] for ids in silent)
        audio, patches = timeline.media()
        assert (audio is not None) == sc.has_audio and (patches is not None) == sc.has_video
        assert export["scripted"] == [k for k, s in enumerate(target.scripted) if s]


def test_chat_teacher_answers_once_and_caches(tokenizer, tmp_path):
    loaded = tiny_loaded(tokenizer)
    teacher = ChatTeacher(loaded, max_tokens=5, cache_path=tmp_path / "teacher.json")
    first = teacher("What is the capital of France?")
    loaded.model.lm_head.weight.data.zero_()  # a second call must not reach the model
    assert teacher("What is the capital of France?") == first
    teacher.save()
    again = ChatTeacher(loaded, cache_path=tmp_path / "teacher.json")
    assert again.cache == {"What is the capital of France?": first}


def test_target_is_a_frozen_record(tokenizer, scenarios):
    target = build_target(scenarios[0], chatty, tokenizer)
    assert isinstance(target, Target) and len(target.outputs) == scenarios[0].slices
    with pytest.raises(dataclasses.FrozenInstanceError):
        target.outputs = ()


def test_rooms_carry_the_users_voice_where_timing_allows():
    from microturn.eval.phrasebook import TRAIN
    from microturn.train.data import UNVOICED_IN_A_ROOM, in_a_room

    scenarios = [sc for s in range(4) for sc in generate("train", s, 6)]
    roomed = in_a_room(scenarios, 0.6, seed=3)
    assert roomed == in_a_room(scenarios, 0.6, seed=3)  # the same rooms from the same seed
    voiced = 0
    for before, after in zip(scenarios, roomed, strict=True):
        assert (before.words, before.expect) == (after.words, after.expect)
        if after.voice and not before.voice:
            voiced += 1
            assert after.family not in UNVOICED_IN_A_ROOM and after.voice in TRAIN.voices
            assert 0.3 <= after.voice_level <= 0.8 and after.noise_level > 0
    assert voiced > 10
    # negative control: no room, no voice added
    assert in_a_room(scenarios, 0.0, seed=3) == scenarios


def test_catch_trials_never_cue_and_their_target_is_silence(tokenizer):
    from microturn.eval.micro_turn import SlicedMedia
    from microturn.sequence.media_specs import FrameSpec
    from microturn.train.data import CAUGHT_FAMILIES, catch_trials

    scenarios = [sc for s in range(3) for sc in generate("train", s, 6)]
    caught = catch_trials(scenarios, 0.5, seed=4)
    assert caught == catch_trials(scenarios, 0.5, seed=4)
    n = 0
    for before, after in zip(scenarios, caught, strict=True):
        if after == before:
            continue
        n += 1
        assert after.family in CAUGHT_FAMILIES and not after.expect.events and not after.sounds
        assert (after.words, after.slices) == (before.words, before.slices)
        media = SlicedMedia(after, FrameSpec())
        if after.family == "cue_audio":  # the noise goes on, the sound never comes
            assert all(media.audio(k).max() < 13 for k in range(after.slices))
        else:  # the screen never changes
            assert after.screen.change_ms is None
        target = build_target(after, chatty, tokenizer)
        assert score(after, list(target.outputs)).passed
        assert not any(target.outputs[before.expect.quiet_from:])
        # negative control: the word said where the cue would have been fails the catch trial
        guessed = list(target.outputs)
        event = before.expect.events[0]
        guessed[event.slice] = f" {event.keywords[0]}."
        assert not score(after, guessed).passed and score(before, guessed).passed
    assert n >= 3
    assert catch_trials(scenarios, 0.0, seed=4) == scenarios


def test_interruption_is_yielded_to_once_it_is_recognisable(tokenizer):
    scenarios = [sc for s in range(6) for sc in generate("train", s, 12, ["interruption"])]
    late = [sc for sc in scenarios if yield_slice(sc) > sc.expect.stop_onset]
    assert late and all(not sc.voice for sc in late)
    for sc in late:  # "Right, but ...": a first word that could be a backchannel alone
        assert sc.words[0].text.strip(",.").lower() in {"yes", "right", "hmm", "alright"}
        assert yield_slice(sc) == (sc.words[1].end_ms - 1) // 200
        target = build_target(sc, chatty, tokenizer)
        assert target.outputs[sc.expect.stop_onset] and not target.outputs[yield_slice(sc)]
        assert score(sc, list(target.outputs)).passed  # still inside the eval's stop window
    voiced = [sc for sc in scenarios if sc.voice]
    assert voiced and all(yield_slice(sc) == sc.expect.stop_onset for sc in voiced)
    # negative control: "Wait, stop ..." is an interruption from its first word
    plain = [sc for sc in scenarios if not sc.voice and sc.words[0].text.startswith("Wait")]
    assert plain and all(yield_slice(sc) == sc.expect.stop_onset for sc in plain)


def test_the_decisions_the_metrics_judge_are_moments(tokenizer):
    """Backchannel: every slice of the window the metric watches weighs as a moment. A result
    that lands while the user talks: each slice it waits is a moment, silent in the target,
    and speaking in one of them fails the metric (the negative control)."""
    for sc in generate("train", 5, 6, ["backchannel"]):
        target = build_target(sc, chatty, tokenizer)
        window = range(sc.expect.keep_talking, sc.expect.keep_talking + BACKCHANNEL_WINDOW_SLICES)
        assert set(window) <= set(target.moments)
    held = [sc for s in range(4) for sc in generate("train", s, 8, ["background"])
            if sc.expect.hold is not None]
    waited = 0
    for sc in held:
        target = build_target(sc, chatty, tokenizer)
        landing = next(k for k, r in enumerate(target.results) if r)
        waiting = range(landing + 1, sc.expect.turn_end)
        assert set(waiting) <= set(target.moments)
        assert not any(target.outputs[k] for k in waiting)
        if len(waiting) and sc.expect.hold[0] <= waiting[0] < sc.expect.hold[1]:
            outputs = list(target.outputs)
            outputs[waiting[0]] = " The answer is here."
            assert score(sc, list(target.outputs)).passed and not score(sc, outputs).passed
            waited += 1
    assert waited
