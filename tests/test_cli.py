"""The `microturn` command as a user runs it, in a subprocess, on the real default model."""

import subprocess
import sys


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "microturn", *args], capture_output=True,
                          text=True, timeout=300)


def test_generate_prints_a_sensible_continuation():
    result = run_cli("generate", "--prompt", "The capital of France is", "--max-tokens", "8")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert "tokens/s" in result.stderr and "tokens/s" not in result.stdout


def test_generate_chat_and_sampling_flags():
    result = run_cli("generate", "--prompt", "Say hello.", "--chat", "--max-tokens", "6",
                     "--temperature", "0.7", "--top-p", "0.9", "--top-k", "40", "--seed", "3",
                     "--dtype", "bf16")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


def test_errors_are_one_line_without_traceback(tmp_path):
    missing = run_cli("generate", "--prompt", "hi", "--model", str(tmp_path / "nope.gguf"))
    assert missing.returncode == 2
    assert missing.stderr.strip().count("\n") == 0
    assert "nope.gguf: no such file" in missing.stderr and "Traceback" not in missing.stderr
    bad = run_cli("generate", "--prompt", "hi", "--top-p", "1.5")
    assert bad.returncode == 2 and "top_p must be in (0, 1]" in bad.stderr
