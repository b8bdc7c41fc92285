"""The README's two commands are the ones the project really runs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)\n```", (ROOT / "README.md").read_text(), flags=re.S)


def test_ci_runs_the_readme_test_command():
    test_command = next(b for b in bash_blocks() if "pytest" in b)
    assert test_command in (ROOT / ".ci" / "run").read_text()


def test_run_command_installs_and_serves():
    run_command = bash_blocks()[0]
    assert "pip install" in run_command and "torch==2.13.0" in run_command
    assert run_command.rstrip().endswith("mistral-serve serve")
