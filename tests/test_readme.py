"""The README's examples run as pasted: its bash and Python blocks, in order, in one fresh folder."""

import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).parent.parent / "README.md"
SKIP = "<!-- not run by tests/test_readme.py"


def readme_blocks() -> list[tuple[str, str]]:
    """(language, code) of every bash and python block, except those the README marks as not run."""
    blocks = []
    for match in re.finditer(r"(<!--[^\n]*-->\n)?```(bash|python)\n(.*?)```", README.read_text(), re.S):
        marker, language, code = match.groups()
        if not (marker and marker.startswith(SKIP)):
            blocks.append((language, code))
    return blocks


def test_the_readme_marks_exactly_its_long_blocks_as_not_run():
    text = README.read_text()
    assert text.count(SKIP) == 2  # the set-up commands and the full experiments
    assert [language for language, _ in readme_blocks()] == ["bash", "python", "python"]


def test_readme_blocks_run_as_pasted(tmp_path):
    env = dict(os.environ, MINARI_DATASETS_PATH=str(tmp_path / "minari"), CQLSAC_CACHE=str(tmp_path / "cache"),
               OMP_NUM_THREADS="1")
    for language, code in readme_blocks():
        command = ["bash", "-euo", "pipefail", "-c", code] if language == "bash" else [sys.executable, "-c", code]
        done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{language} block failed:\n{code}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
        assert "Traceback" not in done.stderr, done.stderr[-3000:]


def test_the_readme_results_are_copied_from_the_generated_results_page():
    """Every estimate in the README's results table (a value with its interval) appears in docs/results.md."""
    section = README.read_text().split("## Results", 1)[1].split("\n## ", 1)[0]
    estimates = re.findall(r"-?[\d,]+\.\d+ \[-?[\d,]+\.\d+, -?[\d,]+\.\d+\]", section)
    assert estimates, "the README's results section has no estimates"
    page = (README.parent / "docs" / "results.md").read_text()
    assert [e for e in estimates if e not in page] == []
