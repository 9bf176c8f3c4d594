"""Audio, video and text sessions through `microturn serve`'s WebSocket, from real files."""

import base64
import io
import json
import struct
import zlib

import numpy as np
import pytest
from media import speech_wav, write_test_video
from PIL import Image
from serving import serving
from test_server import next_of, run

from microturn.client import ClientError, StreamSession
from microturn.frontend.audio import read_audio, to_model_audio
from microturn.frontend.dmel import dmel
from microturn.frontend.video import frame_to_patches, read_video
from microturn.protocol import AudioOptions, ErrorEvent, OutputEvent, SessionOptions, VideoOptions
from microturn.sequence.media_specs import FrameSpec
from microturn.server.limits import ServerLimits


def test_audio_video_and_text_stream_end_to_end(engine, tmp_path, capsys):
    from microturn.cli import main as cli

    wav = speech_wav(tmp_path, "Hello microturn, look at this.")
    video = write_test_video(tmp_path, seconds=2.0, fps=10)
    timed = tmp_path / "talk.txt"
    timed.write_text("0.0 hello\n0.5 look at this\n")
    with serving(engine) as served:
        common = ["stream", "--url", served.url, "--wav", str(wav), "--video", str(video),
                  "--text-file", str(timed), "--max-output-tokens", "2", "--tail-slices", "2"]
        assert cli(common + ["--fast", "--export", str(tmp_path / "fast.json")]) == 0
        fast_view = capsys.readouterr().out
        assert cli(common + ["--export", str(tmp_path / "live.json")]) == 0
        capsys.readouterr()
    fast = json.loads((tmp_path / "fast.json").read_text())
    live = json.loads((tmp_path / "live.json").read_text())
    assert fast["layout"] == {"slice_ms": 200, "audio": True,
                              "video": {"height": 120, "width": 160, "patch": 40, "fps": 2.0}}
    # the server heard exactly the file: dMel of every slice = the offline dMel of its 200 ms
    samples = read_audio(wav)
    padded = np.zeros(-(-len(samples) // 3200) * 3200, dtype=np.float32)
    padded[:len(samples)] = samples
    offline = dmel(np.clip(padded, -1, 1)).numpy()
    with_audio = [t for t in fast["turns"] if "audio" in t]
    assert len(with_audio) == len(padded) // 3200
    for k, turn in enumerate(with_audio):
        heard = np.frombuffer(base64.b64decode(turn["audio"]), np.uint8)
        # PCM16 rounding may move a value across a bin edge now and then
        assert (heard.reshape(16, 80) != offline[16 * k:16 * k + 16]).mean() < 0.01
    # and saw exactly the video's frames (PNG is lossless), in order
    frames = list(read_video(video, FrameSpec(fps=2.0)))
    seen = [f for t in fast["turns"] for f in t.get("frames", [])]
    assert len(seen) == len(frames) == 4
    for frame, sent in zip(frames, seen, strict=True):
        patches = np.frombuffer(base64.b64decode(sent), np.uint8)
        assert np.array_equal(patches, frame_to_patches(frame, FrameSpec()).numpy().ravel())
    # real time hears the same audio and video as --fast: nothing lost, cut or reordered (a
    # slice whose input arrives after it closed, on a loaded machine, passes it to the next)
    def streams(turns):
        return ([t["audio"] for t in turns if "audio" in t],
                [f for t in turns for f in t.get("frames", [])])

    def inputs(turns):
        return [(t["input_ids"], t.get("audio"), t.get("frames")) for t in turns]

    heard_fast, heard_live = streams(fast["turns"]), streams(live["turns"])
    for fast_stream, live_stream in zip(heard_fast, heard_live, strict=True):
        assert live_stream[:len(fast_stream)] == fast_stream
    live_turns = live["turns"][:len(fast["turns"])]
    if inputs(live_turns) == inputs(fast["turns"]):  # every input in time: the same session
        assert live_turns == fast["turns"]
        assert live["logprobs"][:len(fast["logprobs"])] == fast["logprobs"]
    assert "♪ ▣" in fast_view and "hello" in fast_view


def png_bytes(size=(64, 48)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (1, 2, 3)).save(buffer, "PNG")
    return buffer.getvalue()


def test_bad_media_gets_a_clear_error_and_the_session_goes_on(engine):
    limits = ServerLimits(max_media_bytes=100_000, max_buffered_slices=10)
    options = SessionOptions(max_output_tokens=2, audio=AudioOptions(sample_rate=16_000),
                             video=VideoOptions(fps=5.0))
    slice_pcm = (np.full(3200, 1000, dtype="<i2")).tobytes()

    async def main(url):
        s = await StreamSession.connect(url, options)
        assert s.started.audio_frames_per_slice == 16 and s.started.video_patches_per_frame == 12
        bad = [(b"\x02" + b"not an image", "invalid", "image", None),
               (b"\x01" + b"\x00" * 3, "invalid", "audio", None),
               (b"\x01" + b"\x00" * 100_002, "limit", "frame", 100_000),
               (b"\x09abc", "bad_frame", "frame", None),
               (b"", "bad_frame", "frame", None)]
        for frame, code, field, limit in bad:
            await s.send_raw(frame)
            error = await next_of(s, ErrorEvent)
            assert (error.code, error.field, error.limit) == (code, field, limit), frame
        # more audio than max_buffered_slices (10) may wait: refused whole, the rest kept
        await s.send_audio(slice_pcm * 6)
        await s.send_audio(slice_pcm * 6)
        error = await next_of(s, ErrorEvent)
        assert (error.code, error.field, error.limit) == ("backpressure", "audio", 10)
        for _ in range(12):
            await s.send_image(png_bytes())
        error = await next_of(s, ErrorEvent)
        assert (error.code, error.field) == ("backpressure", "image")
        outputs = [await next_of(s, OutputEvent) for _ in range(7)]
        assert sum(o.input_audio for o in outputs) == 6  # the 6 accepted slices, in order
        assert sum(o.input_frames for o in outputs) == 7  # one frame is due every slice
        ended = await s.end(export=True)
        assert sum("audio" in t for t in ended.export["turns"]) == 6
        # a start whose slices do not hold whole dMel hops is refused, naming the field
        with pytest.raises(ClientError) as refused:
            await StreamSession.connect(url, SessionOptions(slice_ms=210, audio=AudioOptions()))
        assert refused.value.info.field == "slice_ms"
        # so is a sample rate outside what the server resamples
        with pytest.raises(ClientError) as refused:
            await StreamSession.connect(url, SessionOptions.model_construct(
                audio=AudioOptions.model_construct(sample_rate=500, channels=1)))
        assert (refused.value.info.field, refused.value.info.limit) == ("audio.sample_rate",
                                                                        1000)

    with serving(engine, limits) as served:
        run(main(served.url))


def hostile_pngs() -> dict[str, bytes]:
    """Malformed PNGs as a hostile client would send them."""
    good = png_bytes()
    ihdr_end = 8 + 8 + 13 + 4  # signature, IHDR length + type, IHDR data, CRC
    text = b"Comment\x00\x00" + zlib.compress(b"a" * (8 * 2**20))  # inflates to 8 MB
    bomb = struct.pack(">I", len(text)) + b"zTXt" + text + struct.pack(
        ">I", zlib.crc32(b"zTXt" + text))
    wrong_length = bytearray(good)
    wrong_length[8:12] = struct.pack(">I", 12)  # IHDR's data is 13 bytes
    return {"oversized text chunk": good[:ihdr_end] + bomb + good[ihdr_end:],
            "truncated header": good[:20], "wrong chunk length": bytes(wrong_length)}


def test_hostile_frames_get_an_error_and_the_session_goes_on(engine):
    """Each frame is answered with the documented error event; the same connection's session
    then still answers a slice (a crash would close the socket instead)."""
    options = SessionOptions(max_output_tokens=2, video=VideoOptions(fps=5.0))
    frames = [('{"type": "input", "text": "\\ud800 hi"}', "invalid", "text"),
              ('[' * 1000 + ']' * 1000, "bad_json", None),
              ('{"type": "input", "slice": ' + "9" * 5000 + "}", "bad_json", None)]
    frames += [(b"\x02" + png, "invalid", "image") for png in hostile_pngs().values()]

    async def main(url):
        s = await StreamSession.connect(url, options, clock="client")
        for frame, code, field in frames:
            await s.send_raw(frame)
            error = await next_of(s, ErrorEvent)
            assert (error.code, error.field) == (code, field), (str(frame)[:40], error)
        await s.send_raw(json.dumps({"type": "input", "text": " hello"}))
        assert (await next_of(s, OutputEvent)).slice == 0  # the session goes on
        await s.end()

    with serving(engine) as served:
        run(main(served.url))


def test_other_rates_and_stereo_are_resampled_on_the_server(engine):
    """44.1 kHz stereo PCM16 in, 16 kHz mono dMel out: the same codes (within resampling
    error) as the client resampling it offline."""
    rate, seconds = 44_100, 1.2
    t = np.arange(int(rate * seconds)) / rate
    tone = 0.3 * np.sin(2 * np.pi * 300 * t) * (1 + np.sin(2 * np.pi * 2 * t))
    stereo = (np.stack([tone, tone], 1) * 32767).astype("<i2")
    options = SessionOptions(max_output_tokens=1, audio=AudioOptions(sample_rate=rate,
                                                                     channels=2))

    async def main(url):
        s = await StreamSession.connect(url, options, clock="client")
        step = int(rate * 0.2)
        for k in range(6):
            await s.send_audio(stereo[k * step:(k + 1) * step].tobytes())
            await s.send("", slice=k)
        outputs = [await next_of(s, OutputEvent) for _ in range(6)]
        ended = await s.end(export=True)
        return outputs, ended.export

    with serving(engine) as served:
        outputs, export = run(main(served.url))
    heard = [t for t in export["turns"] if "audio" in t]
    assert len(heard) >= 4  # the resampler's ~20 ms delay may hold back the last slice
    offline = dmel(to_model_audio(stereo.astype(np.float32) / 32768, rate)).numpy()
    codes = np.frombuffer(base64.b64decode(heard[1]["audio"]), np.uint8)
    # within one bin almost everywhere: the stream's resampler delay shifts it by < 1 frame
    close = np.abs(codes.reshape(16, 80).astype(int) - offline[16:32].astype(int)) <= 2
    assert close.mean() > 0.9
