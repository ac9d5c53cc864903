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


TOOLS = sorted(
    [os.path.join("tools", f) for f in os.listdir(os.path.join(ROOT, "tools"))
     if f.endswith(".py") and not f.startswith("_")]
    + [os.path.join("tools", "checkpoint", f) for f in os.listdir(os.path.join(ROOT, "tools", "checkpoint"))
       if f.endswith(".py")]
    + [os.path.join("bench", f) for f in os.listdir(os.path.join(ROOT, "bench"))
       if f.endswith(".py") and not f.startswith("_")])
MODULES = ["megatron_k15.train_sft", "megatron_k15.train_rl", "megatron_k15.generate"]


def _run_help(argv):
    import subprocess
    import sys

    return subprocess.run([sys.executable, *argv, "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_every_tool_bench_script_and_entry_point_answers_help():
    """``--help`` works and exits 0 without doing any work (no GPU, no data needed)."""
    import concurrent.futures

    cases = [[t] for t in TOOLS] + [["-m", m] for m in MODULES]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(_run_help, cases))
    for argv, res in zip(cases, results):
        assert res.returncode == 0, f"{' '.join(argv)} --help failed:\n{res.stderr[-2000:]}"
        assert "usage:" in res.stdout, f"{' '.join(argv)} --help printed no usage"
