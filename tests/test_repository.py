"""Repository conventions a clean clone depends on."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ci_runs_the_test_command_written_in_readme():
    readme = open(os.path.join(ROOT, "README.md")).read()
    block = re.search(r"<!-- test-command -->\s*```bash\n(.+?)\n```", readme, re.S)
    assert block, "README.md lost its <!-- test-command --> block"
    command = block.group(1).strip()
    ci_lines = [line.strip() for line in open(os.path.join(ROOT, ".ci", "run"))]
    assert command in ci_lines, f".ci/run does not run README's test command: {command}"
