"""tools/plot_metrics.py: PNG output, key selection and warnings, malformed input errors with
FILE:LINE, a clear message without matplotlib."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "plot_metrics.py"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tool():
    name = "plot_metrics_tool"
    spec = importlib.util.spec_from_file_location(name, TOOL)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop(name, None)


def write_metrics(path, n=20, extra=None, start=1):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for i in range(start, start + n):
            rec = {"iteration": i, "time": 1.7e9 + i, "reward": i / n,
                   "accuracy": 0.5 + i / (4 * n), "response_length_mean": 30.0 - i,
                   "loss": 1.0 / i}
            rec.update((extra or {}))
            f.write(json.dumps(rec) + "\n")
    return path


def test_png_from_two_runs(tool, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    a = write_metrics(tmp_path / "omd" / "metrics.jsonl")
    b = write_metrics(tmp_path / "grpo" / "metrics.jsonl", n=15)
    out = tmp_path / "curves.png"
    rc = tool.main(["--metrics", str(a), str(b), "--out", str(out), "--smooth", "3",
                    "--title", "omd vs grpo", "--keys", "reward,accuracy,response_length_mean"])
    assert rc == 0
    data = out.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 1000
    assert "reward, accuracy, response_length_mean" in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_missing_key_warns_and_still_plots(tool, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    m = write_metrics(tmp_path / "run" / "metrics.jsonl", n=5)
    out = tmp_path / "o.png"
    rc = tool.main(["--metrics", str(m), "--out", str(out), "--keys", "reward,kl_mean"])
    assert rc == 0
    cap = capsys.readouterr()
    assert "warning" in cap.err and "'kl_mean'" in cap.err
    assert "reward" not in cap.err
    assert "1 plot: reward" in cap.out
    assert out.read_bytes()[:8] == PNG_SIGNATURE


def test_all_keys_missing_is_an_error(tool, tmp_path, capsys):
    m = write_metrics(tmp_path / "run" / "metrics.jsonl", n=5)
    out = tmp_path / "o.png"
    assert tool.main(["--metrics", str(m), "--out", str(out), "--keys", "nope,nada"]) != 0
    err = capsys.readouterr().err
    assert "'nope'" in err and "'nada'" in err and "nothing to plot" in err
    assert not out.exists()


@pytest.mark.parametrize("bad_line,needle", [
    ('{"iteration": 3, "reward": ', "invalid JSON"),
    ('[1, 2, 3]', "expected a JSON object"),
    ('{"reward": 0.5}', "missing field 'iteration'"),
    ('{"iteration": "three", "reward": 0.5}', "field 'iteration'"),
])
def test_malformed_line_reports_file_and_line(tool, tmp_path, capsys, bad_line, needle):
    m = tmp_path / "run" / "metrics.jsonl"
    m.parent.mkdir()
    m.write_text('{"iteration": 1, "reward": 0.1}\n\n{"iteration": 2, "reward": 0.2}\n'
                 + bad_line + "\n" + '{"iteration": 4, "reward": 0.4}\n')
    out = tmp_path / "o.png"
    assert tool.main(["--metrics", str(m), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"{m}:4:" in err and needle in err, err
    assert not out.exists()


def test_missing_file_is_an_error(tool, tmp_path, capsys):
    assert tool.main(["--metrics", str(tmp_path / "nope.jsonl"),
                      "--out", str(tmp_path / "o.png")]) == 1
    assert "nope.jsonl" in capsys.readouterr().err


def test_default_keys_skip_iteration_time_and_cap_at_12(tool, tmp_path, monkeypatch, capsys):
    extra = {f"m{i:02d}": float(i) for i in range(10)}
    extra.update({"name": "text", "flag": True, "stop": {"eos": 0.9, "length": 0.1}})
    m = write_metrics(tmp_path / "run" / "metrics.jsonl", n=4, extra=extra)
    seen = {}

    def fake_plot(runs, labels, keys, out, **kw):
        seen.update(keys=keys, labels=labels, runs=runs, **kw)

    monkeypatch.setattr(tool, "plot", fake_plot)
    assert tool.main(["--metrics", str(m), "--out", str(tmp_path / "o.png")]) == 0
    keys = seen["keys"]
    assert len(keys) == 12
    assert keys[:5] == ["reward", "accuracy", "response_length_mean", "loss", "m00"]
    assert not {"iteration", "time", "name", "flag"} & set(keys)
    err = capsys.readouterr().err
    assert "first 12" in err and "stop/eos" in err and "stop/length" in err
    assert seen["labels"] == ["run"]
    # a run directory works as well as the file
    assert tool.main(["--metrics", str(m.parent), "--out", str(tmp_path / "o.png"),
                      "--keys", "stop/eos"]) == 0
    assert seen["keys"] == ["stop/eos"]


def test_read_metrics_last_record_wins_and_sorted(tool, tmp_path):
    m = tmp_path / "metrics.jsonl"
    m.write_text("\n".join(json.dumps(r) for r in [
        {"iteration": 2, "reward": 0.2}, {"iteration": 1, "reward": 0.1},
        {"iteration": 3, "reward": 0.3}, {"iteration": 2, "reward": 0.25},
    ]) + "\n")
    recs = tool.read_metrics(str(m))
    assert [(r["iteration"], r["reward"]) for r in recs] == [(1, 0.1), (2, 0.25), (3, 0.3)]
    xs, ys = tool.series(recs + [{"iteration": 4, "reward": None}], "reward")
    assert xs == [1, 2, 3] and ys == [0.1, 0.25, 0.3]


def test_smooth_and_labels(tool):
    assert tool.smooth([1.0, 2.0, 3.0, 4.0], 1) == [1.0, 2.0, 3.0, 4.0]
    assert tool.smooth([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert tool.smooth([3.0, 6.0, 9.0, 0.0], 3) == [3.0, 4.5, 6.0, 5.0]
    labels = tool.run_labels(["x/a/run/metrics.jsonl", "x/b/run/metrics.jsonl",
                              "x/c/other/metrics.jsonl"])
    assert labels == ["a/run", "b/run", "other"]
    same = tool.run_labels(["r/metrics.jsonl", "r/metrics.jsonl"])
    assert len(set(same)) == 2


@pytest.mark.parametrize("argv,flag", [
    (["--smooth", "0"], "--smooth"),
    (["--smooth", "x"], "--smooth"),
    (["--keys", ","], "--keys"),
    (["--out", "curves.jpg"], "--out"),
    (["--out", "/nonexistent-dir-xyz/o.png"], "--out"),
])
def test_bad_arguments(tool, tmp_path, capsys, argv, flag):
    m = write_metrics(tmp_path / "run" / "metrics.jsonl", n=2)
    base = {"--out": str(tmp_path / "o.png")}
    args = ["--metrics", str(m)]
    if "--out" not in argv:
        args += ["--out", base["--out"]]
    with pytest.raises(SystemExit) as e:
        tool.main(args + argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and flag in err


def test_cli_help_and_missing_matplotlib(tmp_path):
    h = subprocess.run([sys.executable, str(TOOL), "--help"], capture_output=True, text=True,
                       timeout=60)
    assert h.returncode == 0
    for flag in ("--metrics", "--out", "--keys", "--smooth", "--title"):
        assert flag in h.stdout
    # a matplotlib that cannot be imported shadows the real one
    fake = tmp_path / "fake" / "matplotlib"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named matplotlib')\n")
    m = write_metrics(tmp_path / "run" / "metrics.jsonl", n=3)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(tmp_path / "fake"), str(REPO), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, str(TOOL), "--metrics", str(m), "--out",
                        str(tmp_path / "o.png")], capture_output=True, text=True, timeout=60,
                       env=env)
    assert r.returncode != 0
    assert "pip install matplotlib" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "o.png").exists()


def test_default_keys_put_what_a_run_is_judged_by_first(tool):
    runs = [[{"iteration": 1, "rollout_time_s": 1.0, "rollout_tokens": 5, "grad_norm": 0.1, "reward_mean": 0.5,
              "accuracy": 0.2, "zeta": 3.0}]]
    assert tool.default_keys(runs) == ["reward_mean", "accuracy", "grad_norm", "rollout_time_s", "rollout_tokens",
                                       "zeta"]
