"""The browser client in a real headless Chromium (Debian's, driven by Playwright; no browser
download): fake microphone from a speech WAV, typed text, the shipped model answering. The
page loads without console errors, its audio reaches the server, the model's words appear in
the output lane, and a screenshot is kept (`MICROTURN_ARTIFACTS`, default test-artifacts/)."""

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile
from media import speech_wav
from serving import serving

from microturn.checkpoint.shipped import load_interaction_model
from microturn.engine.engine import Engine, EngineConfig
from microturn.kernels import build

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
playwright = pytest.importorskip("playwright.sync_api")
pytestmark = pytest.mark.skipif(CHROMIUM is None or build.load() is None,
                                reason="needs Debian's chromium (.ci/run installs it) and "
                                       "the CPU kernels")
KEY = "browser-key"
ARTIFACTS = Path(os.environ.get("MICROTURN_ARTIFACTS", "test-artifacts"))


def then_quiet(path: Path, seconds: float = 30.0) -> Path:
    """The WAV with a quiet room after the words: Chromium loops its fake microphone, and a
    model that hears someone talking without a pause rightly never takes the turn."""
    samples, rate = soundfile.read(path, dtype="int16")
    room = np.random.default_rng(0).standard_normal(int(rate * seconds)) * 300
    soundfile.write(path, np.concatenate([samples, room.astype("int16")]), rate,
                    subtype="PCM_16")
    return path


def test_page_streams_microphone_and_text_and_shows_both_lanes(tmp_path):
    engine = Engine(load_interaction_model(), EngineConfig(kv_budget_mb=64, max_sessions=4))
    engine.warm_up(media=True)
    wav = then_quiet(speech_wav(tmp_path, "Hello there. Can you hear me?"))
    problems: list[str] = []
    with serving(engine, api_key=KEY) as served, playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync",
            "--disable-background-networking", "--disable-component-update",
            "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={wav}",
            "--autoplay-policy=no-user-gesture-required"])
        page = browser.new_page()
        page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.goto(served.url + "/")
        page.fill("#key", KEY)
        page.click("#start")
        page.wait_for_function("document.getElementById('status').textContent"
                               ".startsWith('live')", timeout=20_000)
        # the server says which slices carried audio: the microphone got through. The words
        # take the file's first ~2 s; typing after 4 s of audio puts the instruction in the
        # quiet room, where the model acknowledges it. Typed into the words, what it does
        # hangs on where they land (seen: "lantern." at once here, nothing in 40 s in CI):
        # the test would time that race instead of the page
        page.wait_for_function("Number(document.getElementById('heard').textContent) >= 20",
                               timeout=30_000)
        page.fill("#text", "When you hear a bell, say lantern.")
        page.press("#text", "Enter")
        page.wait_for_function("[...document.querySelectorAll('#out .cell.text')]"
                               ".map(c => c.textContent).join('').trim().length > 0",
                               timeout=40_000)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shot = ARTIFACTS / "browser.png"
        page.screenshot(path=str(shot), full_page=True)
        said = "".join(page.locator("#out .cell.text").all_text_contents())
        typed = "".join(page.locator("#in .cell.text").all_text_contents())
        page.click("#start")  # stop: the page ends the session
        page.wait_for_function("document.getElementById('status').textContent !== 'connecting…'"
                               " && document.getElementById('start').textContent === 'Start'")
        browser.close()
    assert not problems, problems
    assert "lantern" in typed and said.strip()
    assert shot.stat().st_size > 10_000
