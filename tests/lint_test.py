"""Style and architecture checks run with the tests: ruff and the import-linter layer contracts."""

import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tool(name):
    path = shutil.which(name) or os.path.join(os.path.dirname(sys.executable), name)
    if not os.path.exists(path):
        pytest.fail(f"{name} is not installed; pip install -e '.[test]'")
    return path


@pytest.mark.parametrize(
    "command",
    [["ruff", "check", "."], ["ruff", "format", "--check", "."], ["lint-imports"]],
    ids=["ruff-check", "ruff-format", "import-layers"],
)
def test_clean(command):
    result = subprocess.run([_tool(command[0]), *command[1:]], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_ci_runs_exactly_the_readme_test_command():
    """.ci/run ends with the README's test-suite command, so CI tests what a user runs."""
    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    block = readme.split("Run the whole test suite", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    (command,) = [line for line in block.splitlines() if line.strip()]
    with open(os.path.join(REPO, ".ci", "run")) as f:
        lines = [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
    assert lines[-1] == command.strip(), (lines[-1], command)
