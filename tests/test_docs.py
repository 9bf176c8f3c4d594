"""The README's commands are the ones CI runs, and the docs name files that exist."""

import re
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)
    test_command = next(b for b in blocks if b.rstrip().endswith("pytest"))
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command.strip() in [line.strip() for line in ci_lines]


def test_architecture_map_names_real_modules():
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    for path in re.findall(r"`(microturn/[\w/]+\.py)`", text):
        assert (ROOT / path).is_file(), f"docs/ARCHITECTURE.md names missing {path}"
