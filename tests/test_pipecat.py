"""Pipecat's OpenAI Realtime service against `/v1/realtime`, driven with a speech WAV
(examples/pipecat_realtime.py). Pipecat's pins clash with microturn's, so it runs from its own
venv, named by MICROTURN_PIPECAT_PYTHON (docs/PROTOCOL.md says how to make one); without it
this test is skipped."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from media import speech_wav
from serving import serving

from microturn.checkpoint.shipped import load_interaction_model
from microturn.engine.engine import Engine, EngineConfig

PYTHON = os.environ.get("MICROTURN_PIPECAT_PYTHON")
SCRIPT = Path(__file__).parents[1] / "examples" / "pipecat_realtime.py"


@pytest.mark.skipif(not PYTHON, reason="set MICROTURN_PIPECAT_PYTHON to a venv with "
                                       "pipecat-ai[openai]==1.14.0")
def test_pipecat_realtime_service_talks_to_microturn(tmp_path):
    engine = Engine(load_interaction_model(), EngineConfig(kv_budget_mb=64, max_sessions=4))
    engine.warm_up(media=True)
    wav = speech_wav(tmp_path, "Hello there.")
    with serving(engine) as served:
        run = subprocess.run([PYTHON, str(SCRIPT), "--url", served.url.replace("http", "ws") +
                              "/v1/realtime", "--wav", str(wav), "--text",
                              "When you hear a beep, say lantern.", "--silence", "3",
                              "--timeout", "40"],
                             capture_output=True, text=True, timeout=120)
    sys.stdout.write(run.stdout)
    assert run.returncode == 0, run.stdout + run.stderr[-2000:]
    assert "transcript: ''" not in run.stdout and "output audio:" in run.stdout
