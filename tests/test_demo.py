"""`microturn demo`, the main job, end to end on the real default model."""

import subprocess
import sys


def test_demo_runs_and_summarises():
    result = subprocess.run([sys.executable, "-m", "microturn", "demo", "--extra-slices", "0"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "slice  0" in out and "ana" in out and "silence" in out
    assert "summary" in out and "deadline misses" in out and "KV pool" in out
