"""The README's commands are the ones CI runs, and the docs it links exist."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(*parts):
    with open(os.path.join(ROOT, *parts)) as f:
        return f.read()


def test_ci_runs_the_readme_test_command():
    readme = read("README.md")
    commands = re.findall(r"```bash\n(.+?)\n```", readme)
    assert len(commands) == 2, "the README has exactly two set-up commands"
    assert "examples/demo.py" in commands[0] and "pytest" in commands[1]
    assert commands[1] in read(".ci", "run")


def test_linked_docs_exist():
    for link in re.findall(r"\]\((docs/[^)]+)\)", read("README.md")):
        assert os.path.exists(os.path.join(ROOT, link)), link
