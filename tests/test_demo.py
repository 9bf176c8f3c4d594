"""`microturn demo`, the main job, end to end on the real default model; its exported sessions
checked by `microturn verify-alignment`."""

import json
import subprocess
import sys


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "microturn", *args], capture_output=True,
                          text=True, timeout=600)


def test_demo_runs_summarises_and_its_sessions_verify(tmp_path):
    result = run_cli("demo", "--extra-slices", "0", "--temperature", "0.8", "--fast",
                     "--export-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "slice  0" in out and "reply" in out and "silence" in out
    for behaviour in ("pause", "interrupt", "reminder", "beep", "colour", "delegate", "talk-on"):
        assert f"{behaviour} (" in out  # each session's verdict by the benchmark's metric
    assert "summary" in out and "deadline misses" in out and "KV pool" in out
    assert "exported 8 sessions" in out

    session = tmp_path / "reply.json"
    verified = run_cli("verify-alignment", str(session))
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "first differing position: none" in verified.stdout
    compared = int(verified.stdout.split("positions compared: ")[1].split()[0])
    assert compared >= 10

    # negative control: one log-probability off by one ulp-sized step is found, exit 1
    export = json.loads(session.read_text())
    index = max(i for i, v in enumerate(export["logprobs"]) if v is not None)
    export["logprobs"][index] = export["logprobs"][index] * (1 + 1e-7) - 1e-9
    tampered = tmp_path / "tampered.json"
    tampered.write_text(json.dumps(export))
    failed = run_cli("verify-alignment", str(tampered))
    assert failed.returncode == 1
    assert f"first differing position: {index}" in failed.stdout

    # not an export: one clear line, exit 2
    garbage = tmp_path / "garbage.json"
    garbage.write_text('{"turns": 3}')
    bad = run_cli("verify-alignment", str(garbage))
    assert bad.returncode == 2 and "not a session export" in bad.stderr
    assert "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
