"""The audio/video front-end on real media: espeak-ng speech, an MPEG-4 file, PNG/JPEG."""

import io
import json

import numpy as np
import pytest
import soundfile
import torch
from media import frame_colour, speech_wav, write_test_video
from PIL import Image
from test_engine import tiny_loaded

from microturn import MicroturnError
from microturn.checkpoint.interaction import frontend_weights_path
from microturn.engine.engine import Engine, EngineConfig
from microturn.engine.session import SessionParams
from microturn.frontend.assembler import MediaAssembler
from microturn.frontend.audio import Pcm16Stream, read_audio
from microturn.frontend.dmel import dmel, dmel_to_audio
from microturn.frontend.video import decode_image, frame_to_patches, patches_to_frame, read_video
from microturn.sequence.media_specs import AUDIO_RATE, DMelSpec, FrameSpec
from microturn.sequence.timeline import SliceLayout, Timeline
from microturn.train.alignment import verify_alignment


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    return read_audio(speech_wav(tmp_path_factory.mktemp("speech")))


def envelope(wave: np.ndarray, block: int = 800) -> np.ndarray:
    """Log RMS per 50 ms."""
    blocks = wave[:len(wave) // block * block].reshape(-1, block)
    return np.log(np.sqrt((blocks ** 2).mean(1)) + 1e-4)


def test_speech_is_resampled_to_16khz(tmp_path):
    path = speech_wav(tmp_path)
    info = soundfile.info(str(path))
    assert info.samplerate != AUDIO_RATE  # espeak-ng speaks at 22,050 Hz: resampling runs
    wave = read_audio(path)
    assert abs(len(wave) - info.duration * AUDIO_RATE) <= 2
    stereo = tmp_path / "stereo.flac"
    raw, rate = soundfile.read(str(path), dtype="float32")
    soundfile.write(str(stereo), np.stack([raw, raw], 1), rate)
    np.testing.assert_allclose(read_audio(stereo), wave, atol=2e-4)  # FLAC, 2 channels


def test_dmel_of_speech_has_the_expected_shape_and_bins(speech):
    spec = DMelSpec()
    codes = dmel(speech)
    assert codes.dtype == torch.uint8
    assert codes.shape == (len(speech) // spec.hop, 80)
    assert int(codes.max()) <= 15 and int(codes.min()) == 0  # 4 bits; leading zeros are bin 0
    used = torch.bincount(codes.flatten().long(), minlength=16)
    assert (used > 0).sum() >= 12  # speech spreads over the range, not clipped to the ends
    assert spec.frames_per_slice(200) == 16
    with pytest.raises(ValueError, match="slice_ms 210"):
        spec.frames_per_slice(210)


def test_streaming_dmel_equals_offline_in_any_chunking(speech):
    offline = dmel(speech)
    for chunk in (3200, 777, 1):
        assembler = MediaAssembler(SliceLayout(audio=True), max_slices=10 ** 6)
        slices = []
        for start in range(0, len(speech), chunk):
            assembler.push_audio(speech[start:start + chunk])
            while assembler.buffered_audio_slices >= 1:
                slices.append(assembler.take().audio)
            if chunk == 1 and len(slices) > 5:
                break
        whole = torch.cat(slices)
        assert torch.equal(whole, offline[:len(whole)])


def test_inverse_sounds_like_the_input(speech, tmp_path):
    back = dmel_to_audio(dmel(speech))
    soundfile.write(str(tmp_path / "heard.wav"), back, AUDIO_RATE)  # what the model hears
    original, rebuilt = envelope(speech), envelope(back)
    assert np.corrcoef(original, rebuilt)[0, 1] > 0.9
    # negative control: the same comparison rejects a waveform with another envelope
    assert np.corrcoef(original, rebuilt[::-1])[0, 1] < 0.5


def test_ten_minutes_of_audio_give_exactly_16_frames_per_slice(speech):
    """600 s through the assembler in uneven network-sized chunks: 3,000 slices of 16 frames,
    each slice's codes the offline codes of its own 200 ms (no drift)."""
    rng = np.random.default_rng(0)
    total = 600 * AUDIO_RATE
    noise = rng.normal(0, 0.05, total).astype(np.float32)
    long_audio = np.resize(speech, total) + noise
    offline = dmel(long_audio)
    assembler = MediaAssembler(SliceLayout(audio=True), max_slices=30)
    position, k = 0, 0
    while position < total:
        step = int(rng.integers(1, 5000))
        assembler.push_audio(long_audio[position:position + step])
        position += step
        while assembler.buffered_audio_slices >= 1:
            codes = assembler.take().audio
            assert codes.shape == (16, 80)
            if k % 97 == 0 or k >= 2990:
                assert torch.equal(codes, offline[16 * k:16 * k + 16]), k
            k += 1
    assert k == 3000 and offline.shape[0] == 48_000
    assert assembler.take().audio is None  # nothing left: the next slice's audio is absent


def test_pcm16_stream_resamples_without_seams():
    rate = 48_000
    t = np.arange(rate) / rate
    tone = (0.5 * np.sin(2 * np.pi * 440 * t) * 32767).astype("<i2")
    stream = Pcm16Stream(rate, channels=1)
    pieces = [stream.push(tone[i:i + 960].tobytes()) for i in range(0, rate, 960)]
    out = np.concatenate(pieces)
    assert abs(len(out) - AUDIO_RATE) < 400  # the resampler's delay (~21 ms), no more
    steady = out[1000:-1000]
    assert np.abs(steady).max() == pytest.approx(0.5, abs=0.01)
    # no seams at the 20 ms chunk edges: no step larger than the tone's own slope allows
    assert np.abs(np.diff(steady)).max() < 2 * np.pi * 440 / AUDIO_RATE * 0.5 * 1.05
    with pytest.raises(MicroturnError, match="multiple of 2 bytes"):
        stream.push(b"\x00\x01\x02")
    with pytest.raises(MicroturnError, match="sample_rate must be in"):
        Pcm16Stream(rate=500)


def test_patches_reassemble_into_the_frame():
    spec = FrameSpec()
    frame = torch.randint(0, 256, (3, spec.height, spec.width), dtype=torch.uint8)
    patches = frame_to_patches(frame, spec)
    assert patches.shape == (12, 3, 40, 40)
    assert torch.equal(patches_to_frame(patches, spec), frame)
    assert torch.equal(patches[spec.cols + 2], frame[:, 40:80, 80:120])  # row 1, column 2
    with pytest.raises(MicroturnError, match="whole number"):
        FrameSpec(height=100)


def test_frames_due_follow_the_clock():
    spec = FrameSpec(fps=2.0)
    due = [spec.frames_due(k, 200) for k in range(3000)]
    assert due[:6] == [1, 0, 1, 0, 0, 1]  # frames at 0, 0.5, 1.0 s
    assert sum(due) == 1200  # 600 s at 2 fps, exactly
    assert sum(FrameSpec(fps=7.5).frames_due(k, 200) for k in range(3000)) == 4500


def test_video_file_is_sampled_on_the_session_clock(tmp_path):
    path = write_test_video(tmp_path, seconds=3.0, fps=10)
    frames = list(read_video(path, FrameSpec(fps=2.0)))
    assert len(frames) == 6
    for j, frame in enumerate(frames):  # frame j is the video's frame at j / 2 s
        colour = torch.tensor(frame_colour(5 * j), dtype=torch.float32)
        assert (frame[:, 100, 80].float() - colour).abs().max() < 8
    with pytest.raises(MicroturnError, match="cannot open video"):
        list(read_video(tmp_path / "missing.mp4", FrameSpec()))
    # an image sequence: a directory of frames, in name order
    sequence = tmp_path / "frames"
    sequence.mkdir()
    for j in range(3):
        Image.new("RGB", (320, 240), frame_colour(j)).save(sequence / f"{j:03d}.png")
    (sequence / "notes.txt").write_text("not a frame")
    frames = list(read_video(sequence, FrameSpec()))
    assert len(frames) == 3
    assert frames[2][:, 0, 0].tolist() == list(frame_colour(2))


def test_images_decode_and_bad_ones_get_a_clear_error():
    spec = FrameSpec()
    for fmt in ("PNG", "JPEG"):
        buffer = io.BytesIO()
        Image.new("RGB", (640, 480), (10, 200, 30)).save(buffer, fmt)
        frame = decode_image(buffer.getvalue(), spec)
        assert frame.shape == (3, 120, 160)
        assert (frame[:, 60, 80].float() - torch.tensor([10., 200., 30.])).abs().max() < 4
    with pytest.raises(MicroturnError, match="cannot decode"):
        decode_image(b"\x89PNG not really", spec)
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "GIF")
    with pytest.raises(MicroturnError, match="PNG or JPEG"):
        decode_image(buffer.getvalue(), spec)


@pytest.fixture
def tiny(smollm_fp32):
    return tiny_loaded(smollm_fp32.tokenizer)


def mixed_session(engine, speech, slices=8, text_every=2):
    """A session with audio and video: speech for the first 5 slices, frames at 2 fps."""
    sid = engine.open(SessionParams(max_output_tokens=3, audio=True, video=FrameSpec(),
                                    deterministic=True))
    assembler = MediaAssembler(engine.sessions[sid].timeline.layout)
    assembler.push_audio(speech[:5 * 3200])
    generator = torch.Generator().manual_seed(1)
    for k in range(slices):
        assembler.push_frame(torch.randint(0, 256, (3, 120, 160), dtype=torch.uint8,
                                           generator=generator))
        media = assembler.take()
        text = engine.loaded.tokenizer.encode(" hello") if k % text_every else []
        engine.append(sid, text, media.audio, media.frames)
        engine.tick()
    return sid


def test_mixed_session_round_trip_and_alignment(tiny, speech):
    engine = Engine(tiny, EngineConfig(kv_budget_mb=64))
    sid = mixed_session(engine, speech)
    session = engine.sessions[sid]
    exported = json.loads(json.dumps(engine.close(sid)))  # through JSON, as a file would
    rebuilt = Timeline.from_export(exported)
    assert rebuilt.tokens() == session.fed + session.unfed
    for a, b in zip(rebuilt.media(), session.timeline.media(), strict=True):
        assert torch.equal(a, b)
    media = engine.markers.media
    turn0, turn6 = (rebuilt.input_tokens(rebuilt.turns[i]) for i in (0, 6))
    assert turn0.count(media.audio_frame) == 16 and turn0.count(media.patch) == 12
    assert turn0.count(media.row_end) == 3  # rows are recoverable
    assert turn6.count(media.absent) == 2  # audio ran out; no frame is due at 1.2 s
    report = verify_alignment(exported, tiny.model, engine.frontend)
    assert report.aligned and report.compared >= 16
    # negative control: a front-end weight changed by one step is caught by the comparison
    with torch.no_grad():
        engine.frontend.audio.table[3] += 0.01
    assert not verify_alignment(exported, tiny.model, engine.frontend).aligned


def test_text_only_sessions_are_bitwise_unchanged_beside_media(tiny, smollm_fp32, speech):
    def text_session(engine, words=" how are you"):
        sid = engine.open(SessionParams(max_output_tokens=3, deterministic=True))
        for k in range(6):
            engine.append(sid, smollm_fp32.tokenizer.encode(words) if k % 2 else [])
            engine.tick()
        return engine.close(sid)

    alone = text_session(Engine(tiny_loaded(smollm_fp32.tokenizer), EngineConfig()))
    engine = Engine(tiny, EngineConfig())
    media_sid = engine.open(SessionParams(max_output_tokens=2, audio=True,
                                          video=FrameSpec(), deterministic=True))
    sid = engine.open(SessionParams(max_output_tokens=3, deterministic=True))
    assembler = MediaAssembler(engine.sessions[media_sid].timeline.layout)
    for k in range(6):
        assembler.push_audio(speech[3200 * k:3200 * (k + 1)])
        assembler.push_frame(torch.full((3, 120, 160), 7 * k, dtype=torch.uint8))
        media = assembler.take()
        engine.append(media_sid, [], media.audio, media.frames)
        engine.append(sid, smollm_fp32.tokenizer.encode(" how are you") if k % 2 else [])
        engine.tick()
    beside = engine.close(sid)
    assert beside["turns"] == alone["turns"] and beside["logprobs"] == alone["logprobs"]
    assert "layout" not in beside  # the text timeline, exactly
    # negative control: one different word changes what the comparison sees
    other = text_session(Engine(tiny_loaded(smollm_fp32.tokenizer), EngineConfig()), " who")
    assert other["logprobs"] != alone["logprobs"]


def test_trainer_steps_on_a_media_session(tiny, speech, tmp_path):
    from microturn.train.batch import TimelineBatch
    from microturn.train.trainer import TrainConfig, Trainer

    engine = Engine(tiny, EngineConfig(kv_budget_mb=64))
    exported = engine.close(mixed_session(engine, speech, slices=5))
    batch = TimelineBatch.from_exports([exported, exported])
    assert batch.audio.shape == (2 * 5 * 16, 80) and batch.patches.shape[1:] == (3, 40, 40)
    media = batch.token_ids[:, 1:] >= engine.markers.vocab_size
    assert media.any() and not (batch.loss_mask & media).any()  # media is never a target
    trainer = Trainer(tiny.model, TrainConfig(lr=1e-3), frontend=engine.frontend)
    before = engine.frontend.video.cell3.weight.detach().clone()
    first = trainer.step(batch)
    assert first.tokens > 0 and first.loss == first.loss  # finite
    assert not torch.equal(before, engine.frontend.video.cell3.weight)  # the stem learns
    trainer.save(tmp_path / "ckpt.safetensors")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "ckpt.safetensors"), "pt") as f:
        assert "model.frontend.audio.table" in set(f.keys())


def test_bad_media_input_names_the_field(tiny):
    engine = Engine(tiny, EngineConfig(kv_budget_mb=16))
    text_only = engine.open(SessionParams())
    with pytest.raises(MicroturnError, match="audio: this session was opened without"):
        engine.append(text_only, [], torch.zeros(16, 80, dtype=torch.uint8))
    sid = engine.open(SessionParams(audio=True, video=FrameSpec()))
    with pytest.raises(MicroturnError, match=r"audio: expected uint8 dMel codes of shape"):
        engine.append(sid, [], torch.zeros(15, 80, dtype=torch.uint8))
    with pytest.raises(MicroturnError, match="codes must be < 16"):
        engine.append(sid, [], torch.full((16, 80), 16, dtype=torch.uint8))
    patches = torch.zeros(12, 3, 40, 40, dtype=torch.uint8)
    with pytest.raises(MicroturnError, match="carries at most 1 frame"):
        engine.append(sid, [], None, [patches, patches])
    with pytest.raises(MicroturnError, match="slice_ms: slice_ms 210"):
        SessionParams(slice_ms=210, audio=True)
    assert not engine.sessions[sid].pending  # nothing half-queued


def test_frontend_weights_save_load_and_corrupt_file(tiny, tmp_path, capsys):
    checkpoint = tmp_path / "model.gguf"
    tiny.path = checkpoint
    fresh = tiny.load_frontend()
    assert "freshly initialised" in capsys.readouterr().err
    fresh.save(frontend_weights_path(checkpoint))
    again = tiny_loaded(tiny.tokenizer)
    again.path = checkpoint
    loaded = again.load_frontend()
    assert "notice" not in capsys.readouterr().err
    for name, value in fresh.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[name]), name
    frontend_weights_path(checkpoint).write_bytes(b"not safetensors")
    broken = tiny_loaded(tiny.tokenizer)
    broken.path = checkpoint
    with pytest.raises(MicroturnError, match="cannot read front-end weights"):
        broken.load_frontend()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dmel_kernel_sums_the_modules_tree_bit_for_bit(dtype):
    """Inference sums a frame's 80 table rows in the CPU kernel, training in torch ops (with
    autograd): the two must give the same bits, or the engine and the trainer would embed the
    same audio differently. Negative controls: one code moved to the next bin changes its
    frame's bits; in fp32 a sequential sum over the channels gives other bits (bf16 rows sum
    exactly in fp32 in any order)."""
    from microturn.frontend.embedding import DMelEmbedding
    from microturn.kernels import build

    if build.load() is None:
        pytest.skip("no CPU kernels here")
    spec = DMelSpec()
    stage = DMelEmbedding(spec, 64)
    torch.nn.init.normal_(stage.table, generator=torch.Generator().manual_seed(0))
    stage = stage.to(dtype)
    codes = torch.randint(0, spec.bins, (37, spec.channels), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        kernel = stage(codes)
    modules = stage(codes).detach()  # the table requires grad: torch's ops
    assert kernel.dtype == modules.dtype == torch.float32
    assert torch.equal(kernel, modules)
    moved = codes.clone()
    moved[5, 7] = (moved[5, 7] + 1) % spec.bins
    with torch.no_grad():
        assert not torch.equal(stage(moved)[5], modules[5])
    if dtype == torch.float32:
        sequential = stage.table[codes.long() + stage.offsets].float().sum(1)
        assert not torch.equal(sequential, kernel)
    with pytest.raises(RuntimeError, match="below 16 bins"):
        build.load().dmel_embedding(stage.table.detach(), codes | 16, spec.bins)
