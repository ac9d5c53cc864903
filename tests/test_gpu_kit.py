"""The GPU kit on CPU: bench/run_all_gpu.sh (stages, time budget, failures, summary), the flags
its GPU commands pass to the bench scripts, bench/train_step.py --smoke against the memory
planner, the references of tests/gpu against float64 autograd, and the tests/gpu code itself at
tiny sizes (``GPU_KIT_DEVICE=cpu``, kernels under the Triton interpreter).

None of this proves anything about a GPU; it proves that the one GPU run a session gets will
not be lost to a typo, a wrong flag or a crash in the harness.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "run_all_gpu.sh"
STAGES = ["env", "triton_warmup", "pytest_gpu", "train_step", "attention", "fused_logprobs",
          "decode_attention", "ring_attention", "generation", "moe_experts", "checkpoint_save",
          "pytest_gpu_legacy"]
STATUS = re.compile(r"^(ok|skipped( \(.*\))?|failed \(rc -?\d+\)|timeout \(\d+s\))$")


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHON"] = sys.executable
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _stages(out: Path) -> dict:
    """stage -> (status, seconds) from the summary's stage table."""
    text = (out / "summary.md").read_text()
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[0] in STAGES:
            rows[cells[0]] = (cells[1], cells[2])
    return rows


def test_script_syntax():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def _with_bench_imports(source: str, seen=None) -> str:
    """A bench script's source and that of the bench modules it imports (flags they share)."""
    seen = set() if seen is None else seen
    for name in re.findall(r"^from bench\.(\w+) import", source, re.M):
        if name not in seen:
            seen.add(name)
            source += _with_bench_imports((ROOT / "bench" / f"{name}.py").read_text(), seen)
    return source


def test_gpu_commands_pass_real_flags():
    """Every GPU-mode command (DRY_RUN lists them) parses with its script's own argparse."""
    res = subprocess.run(["bash", str(SCRIPT)], env=_env(DRY_RUN=1), capture_output=True,
                         text=True, timeout=60, check=True)
    lines = [line.split("\t") for line in res.stdout.strip().splitlines()]
    assert [name for name, _, _ in lines] == STAGES
    # stages share one budget (they run in order of importance); the default keeps the whole
    # run, wheel install and summary included, under the device tool's 10 minutes per command
    budget = int(re.search(r"BUDGET=\$\{GPU_KIT_BUDGET_S:-(\d+)\}", SCRIPT.read_text()).group(1))
    assert budget <= 560 and all(0 < int(limit) <= budget for _, limit, _ in lines)
    for name, _, line in lines:
        for cmd in line.split(";")[-1].split(" && "):  # a stage may run several commands
            argv = shlex.split(cmd)
            if "pytest" in argv:
                i = argv.index("pytest")
                assert argv[i - 1:i + 3] == ["-m", "pytest", "-m", "gpu"], argv
                continue
            scripts = [a for a in argv if a.startswith(("bench/", "tests/gpu/"))]
            if not scripts:
                continue
            script, args = scripts[0], argv[argv.index(scripts[0]) + 1:]
            source = _with_bench_imports((ROOT / script).read_text())
            for flag in (a for a in args if a.startswith("--")):
                assert f'"{flag}"' in source, f"{script} has no flag {flag}"
            mod = _load(ROOT / script, "bench_" + Path(script).stem)
            if hasattr(mod, "parse_args"):
                mod.parse_args(args)  # SystemExit on a bad value
    legacy = next(cmd for name, _, cmd in lines if name == "pytest_gpu_legacy")
    for path in (ROOT / "tests").glob("test_*.py"):
        if re.search(r"^@pytest\.mark\.gpu", path.read_text(), re.M):
            assert f"tests/{path.name}" in legacy


def test_time_budget_skips_what_does_not_fit(tmp_path):
    """A budget below the 20 s floor: every stage is recorded as skipped, exit 0."""
    out = tmp_path / "out"
    res = subprocess.run(["bash", str(SCRIPT)], env=_env(OUT=out, GPU_KIT_BUDGET_S=30),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    stages = _stages(out)
    assert list(stages) == STAGES
    assert all(status == "skipped (time budget spent)" for status, _ in stages.values())


def _fake_python(tmp_path, behaviour: str) -> Path:
    """A 'python' that runs the summary writer (``python -``) for real and does ``behaviour``
    for every stage command."""
    fake = tmp_path / "fakepy"
    fake.write_text(f'#!/bin/sh\nif [ "$1" = "-" ]; then exec "{sys.executable}" "$@"; fi\n'
                    'if [ "$2" = "import pytest_timeout" ]; then exit 1; fi\n'
                    f"{behaviour}\n")
    fake.chmod(0o755)
    return fake


def test_failing_stages_are_recorded_and_the_run_goes_on(tmp_path):
    out = tmp_path / "out"
    fake = _fake_python(tmp_path, "echo 'Traceback: boom' >&2; exit 3")
    res = subprocess.run(["bash", str(SCRIPT)], env=_env(OUT=out, PYTHON=fake),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 1
    stages = _stages(out)
    assert list(stages) == STAGES
    assert all(status == "failed (rc 3)" for status, _ in stages.values()), stages
    summary = (out / "summary.md").read_text()
    assert "Traceback: boom" in summary  # the failing stage's log tail
    logs = (out / "all_logs.txt").read_text()
    assert all(f"===== {s}: failed (rc 3)" in logs for s in STAGES)


def test_a_stage_past_its_limit_is_killed(tmp_path):
    """Budget 21 s (15 kept for the summary), stages of at least 4 s: the first stage gets 6 s,
    sleeps past it, is killed; the rest is skipped."""
    out = tmp_path / "out"
    fake = _fake_python(tmp_path, "sleep 120")
    res = subprocess.run(["bash", str(SCRIPT)], env=_env(OUT=out, PYTHON=fake, GPU_KIT_BUDGET_S=21,
                                                        GPU_KIT_MIN_STAGE_S=4),
                         capture_output=True, text=True, timeout=150)
    assert res.returncode == 1
    stages = _stages(out)
    assert stages["env"][0].startswith("timeout (")
    assert 4 <= int(stages["env"][1]) <= 20
    assert all(stages[s][0] == "skipped (time budget spent)" for s in STAGES[1:])


@pytest.mark.slow
def test_smoke_run_reports_every_stage(tmp_path):
    """SMOKE=1 on CPU: every stage runs in a tiny mode or is skipped with a message; the
    summary lists them all, train_step's peak memory matches the planner."""
    out, logs = tmp_path / "out", tmp_path / "logs"
    res = subprocess.run(["bash", str(SCRIPT)], env=_env(SMOKE=1, OUT=out, LOG_DIR=logs),
                         capture_output=True, text=True, timeout=900)
    print(res.stdout[-3000:])
    assert res.returncode == 0, res.stdout[-5000:] + res.stderr[-3000:]
    stages = _stages(out)
    assert list(stages) == STAGES
    for name, (status, _) in stages.items():
        assert STATUS.match(status), (name, status)
    for name in ("env", "train_step", "fused_logprobs", "generation", "ring_attention"):
        assert stages[name][0] == "ok", (name, stages[name])
    for name in ("triton_warmup", "attention", "decode_attention"):
        assert stages[name][0] == "skipped (no GPU; flags parsed)"
    assert stages["pytest_gpu"][0] == "skipped (no GPU)"
    assert sorted(p.name for p in out.iterdir()) == ["all_logs.txt", "summary.md"]
    summary = (out / "summary.md").read_text()
    assert "| seq | step s | tokens/s |" in summary and "| uniform | 1 | 8 |" in summary
    data = json.loads((logs / "train_step.json").read_text())
    (row,) = data["rows"]
    assert row["status"] == "ok" and row["seq_length"] == 64 and math.isfinite(row["grad_norm"])
    assert row["predicted_peak_bytes"] == pytest.approx(row["peak_bytes"], rel=0.03)


# -- the references of tests/gpu -------------------------------------------------------------
@pytest.fixture(scope="module")
def refs():
    return _load(ROOT / "tests" / "gpu" / "gpu_refs.py", "gpu_refs_under_test")


@pytest.mark.parametrize("causal,hkv", [(True, 2), (False, 1), (True, 4)])
def test_chunked_attention_reference_equals_autograd(refs, causal, hkv):
    from megatron_k15.kernels.flash_attention import attention_reference

    g = torch.Generator().manual_seed(hkv)
    b, s, h, d = 2, 37, 4, 8
    q, do = (torch.randn(b, s, h, d, generator=g, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(b, s, hkv, d, generator=g, dtype=torch.float64) for _ in range(2))
    qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
    out, lse = attention_reference(qq, kk, vv, causal=causal, return_lse=True)
    want = (out, lse) + torch.autograd.grad(out, (qq, kk, vv), do)
    got = refs.attention_reference_chunked(q, k, v, do, causal=causal, max_elems=h * s * 5)
    for a, b_ in zip(got, want):
        assert refs.max_err(a, b_) < 1e-12
    lowp = refs.sdpa_fwd_bwd(q, k, v, do, causal=causal)  # float64 here: exact
    for a, b_ in zip(lowp, (want[0],) + want[2:]):
        assert refs.max_err(a, b_) < 1e-12


def test_chunked_varlen_reference_equals_per_sequence(refs):
    from megatron_k15.kernels.flash_attention import varlen_attention_reference

    lengths = [1, 9, 20]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    g = torch.Generator().manual_seed(0)
    q, do = (torch.randn(30, 4, 8, generator=g, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(30, 2, 8, generator=g, dtype=torch.float64) for _ in range(2))
    qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
    out, lse = varlen_attention_reference(qq, kk, vv, cu, return_lse=True)
    want = (out, lse) + torch.autograd.grad(out, (qq, kk, vv), do)
    got = refs.varlen_attention_reference_chunked(q, k, v, cu, do, max_elems=40)
    for a, b_ in zip(got, want):
        assert refs.max_err(a, b_) < 1e-12
    lowp = refs.sdpa_varlen_fwd_bwd(q, k, v, cu, do)
    for a, b_ in zip(lowp, (want[0],) + want[2:]):
        assert refs.max_err(a, b_) < 1e-12


def test_chunked_logprobs_reference_equals_autograd(refs):
    g = torch.Generator().manual_seed(1)
    N, V, H = 37, 50, 8
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64)
    targets = torch.randint(0, V, (N,), generator=g)
    gl, ge = torch.randn(N, generator=g, dtype=torch.float64), torch.randn(N, generator=g, dtype=torch.float64)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logsm = torch.log_softmax(h @ w.t(), -1)
    lp = logsm.gather(1, targets[:, None])[:, 0]
    ent = -(logsm.exp() * logsm).sum(-1)
    want = (lp, ent) + torch.autograd.grad((lp * gl).sum() + (ent * ge).sum(), (h, w))
    got = refs.logprobs_reference_chunked(hidden, weight, targets, gl, ge, chunk=10,
                                          dtype=torch.float64)
    for a, b_ in zip(got, want):
        assert refs.max_err(a, b_) < 1e-10
    lowp = refs.unfused_logprobs_lowp(hidden.float(), weight.float(), targets, gl.float(),
                                      ge.float(), chunk=10)
    for a, b_ in zip(lowp, want):
        assert refs.max_err(a, b_) < 1e-4


def test_bounds_and_error_measures(refs):
    assert refs.low_precision_bound(0.01, 2.0, torch.bfloat16) == pytest.approx(0.04)
    assert refs.low_precision_bound(0.01, 1.0, torch.float16, grad=True) == pytest.approx(0.025)
    ref = torch.tensor([[10.0, -10.0], [0.1, 0.2], [1e-9, 0.0]])
    got = ref + torch.tensor([[0.5, 0.0], [0.01, 0.0], [0.0, 0.0]])
    # row 0: 0.5 / 10; row 1: 0.01 / 0.2; row 2 is ~0 and floored at half the median row max
    assert refs.row_err(got, ref) == pytest.approx(0.05)
    got[2, 1] = 0.05
    assert refs.row_err(got, ref) == pytest.approx(0.05 / (0.5 * 0.2))
    assert math.isnan(refs.max_err(torch.tensor([float("nan")]), torch.tensor([0.0])))
    inf = torch.tensor([float("-inf"), 1.0])
    assert refs.max_err(inf, torch.tensor([float("-inf"), 1.5])) == pytest.approx(0.5)


@pytest.mark.slow
def test_gpu_tests_run_at_tiny_sizes_on_cpu(tmp_path):
    """tests/gpu with GPU_KIT_DEVICE=cpu: the test code itself (not the GPU) at tiny sizes, the
    kernels interpreted; every case passes."""
    rec = tmp_path / "rec.jsonl"
    env = _env(GPU_KIT_DEVICE="cpu", GPU_KIT_RECORD=rec)
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider",
                          "tests/gpu"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=1500)
    tail = res.stdout[-4000:]
    assert res.returncode == 0, tail + res.stderr[-2000:]
    last = [line for line in res.stdout.splitlines() if " passed" in line][-1]
    assert not re.search(r"\d+ (failed|errors?|skipped)", last), last
    assert int(re.search(r"(\d+) passed", last).group(1)) >= 15
    recs = [json.loads(line) for line in rec.read_text().splitlines()]
    modules = {r["test"].split("::")[0] for r in recs}
    assert {f"tests/gpu/test_gpu_{m}.py" for m in
            ("flash_attention", "decode_attention", "fused_logprobs", "model", "generation",
             "ring_attention", "grouped_gemm")} <= modules
    bad = {r["test"] for r in recs if not r["ok"]}
    assert not bad, bad
