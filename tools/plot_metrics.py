#!/usr/bin/env python
"""Draw metrics.jsonl curves to an image (DESIGN.md section 7).

    python tools/plot_metrics.py --metrics runs/rl/metrics.jsonl --out rl.png
    python tools/plot_metrics.py --metrics runs/omd/metrics.jsonl runs/grpo/metrics.jsonl \\
        --keys reward,accuracy,response_length_mean --smooth 5 --title "OMD vs GRPO" --out cmp.png

Each metrics file has one JSON object per line with at least ``"iteration"`` (blank lines
are ignored; nested objects are flattened to ``outer/inner`` keys). Every key gets its own
subplot with the iteration on the x axis; several files are overlaid, each labelled with
its directory name. When an iteration appears more than once in a file (a resumed run), the
last record wins.

Default keys: every numeric key except iteration/time/timestamp, the ones a run is judged
by first (reward, accuracy, length, loss, KL, entropy, grad norm: ``FIRST_KEYS``), then the
others in order of first appearance, at most 12 subplots. A key given with --keys that no file has is skipped with a
warning. A malformed line stops the run with ``FILE:LINE: ...`` on stderr and exit code 1.

Needs matplotlib (``pip install matplotlib``); it draws with the Agg backend (no display).
The image is written to a temporary name and renamed into place.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from typing import Optional

PROG = "plot_metrics.py"
EXCLUDED_KEYS = ("iteration", "time", "timestamp")
MAX_SUBPLOTS = 12
FORMATS = ("png", "pdf", "svg")


class MetricsError(Exception):
    """A problem with an input file, reported as ``FILE:LINE: message``."""


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _flatten(obj: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in obj.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, name + "/"))
        else:
            out[name] = v
    return out


def read_metrics(path: str) -> list[dict]:
    """Records of a metrics.jsonl, flattened, one per distinct iteration (last one wins),
    sorted by iteration. Raises MetricsError naming the file and line."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise MetricsError(f"{path}: cannot open: {e.strerror or e}") from None
    by_iter: dict[float, dict] = {}
    with f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise MetricsError(f"{path}:{lineno}: not valid UTF-8 ({e.reason})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise MetricsError(f"{path}:{lineno}: invalid JSON: {e.msg} "
                                   f"(column {e.colno})") from None
            if not isinstance(obj, dict):
                raise MetricsError(f"{path}:{lineno}: expected a JSON object, got "
                                   f"{type(obj).__name__}")
            if "iteration" not in obj:
                raise MetricsError(f"{path}:{lineno}: missing field 'iteration'")
            it = obj["iteration"]
            if not _is_number(it) or not math.isfinite(it):
                raise MetricsError(f"{path}:{lineno}: field 'iteration': expected a number, "
                                   f"got {it!r}")
            by_iter[it] = _flatten(obj)
    return [by_iter[k] for k in sorted(by_iter)]


# what a run is judged by, drawn first when present (the trainers log timings and counts first)
FIRST_KEYS = ("reward_mean", "reward", "accuracy", "eval_accuracy", "response_length_mean", "loss", "valid_loss",
              "kl_proxy", "entropy", "grad_norm", "dpo_reward_margin", "dpo_accuracy")


def default_keys(runs: list[list[dict]]) -> list[str]:
    keys: list[str] = []
    seen = set()
    for records in runs:
        for rec in records:
            for k, v in rec.items():
                if k in seen or k in EXCLUDED_KEYS or not _is_number(v):
                    continue
                seen.add(k)
                keys.append(k)
    return [k for k in FIRST_KEYS if k in seen] + [k for k in keys if k not in FIRST_KEYS]


def run_labels(paths: list[str]) -> list[str]:
    """Legend labels: each file's directory name, made unique with more path when needed."""
    def label(p: str, depth: int) -> str:
        ap = os.path.abspath(p)
        parts = ap.split(os.sep)[:-1] if os.path.basename(ap) == "metrics.jsonl" else \
            ap.split(os.sep)
        parts = [x for x in parts if x]
        if not parts:
            return p
        return "/".join(parts[-depth:])

    labels = [label(p, 1) for p in paths]
    for depth in range(2, 12):
        dupes = {lb for lb in labels if labels.count(lb) > 1}
        if not dupes:
            return labels
        labels = [label(p, depth) if lb in dupes else lb for p, lb in zip(paths, labels)]
    if len(set(labels)) != len(labels):
        labels = [f"{lb} ({i})" for i, lb in enumerate(labels)]
    return labels


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average over up to ``window`` points."""
    if window <= 1:
        return list(values)
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for rec in records:
        v = rec.get(key)
        if _is_number(v) and math.isfinite(v):
            xs.append(rec["iteration"])
            ys.append(float(v))
    return xs, ys


def _import_pyplot():
    try:
        import matplotlib
    except ImportError:
        raise SystemExit(f"{PROG}: error: matplotlib is not installed; install it with "
                         f"`pip install matplotlib`") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(runs: list[list[dict]], labels: list[str], keys: list[str], out: str, *,
         smooth_window: int = 1, title: Optional[str] = None, fmt: str = "png") -> None:
    plt = _import_pyplot()
    n = len(keys)
    ncols = min(3, n)
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.0 * ncols, 3.4 * nrows), squeeze=False)
    try:
        for i, key in enumerate(keys):
            ax = axes[i // ncols][i % ncols]
            for records, lb in zip(runs, labels):
                xs, ys = series(records, key)
                if not xs:
                    continue
                ax.plot(xs, smooth(ys, smooth_window), label=lb,
                        marker="o" if len(xs) == 1 else None, linewidth=1.5)
            ax.set_title(key + (f" (smoothed {smooth_window})" if smooth_window > 1 else ""),
                         fontsize=10)
            ax.set_xlabel("iteration")
            ax.grid(True, alpha=0.3)
            if len(runs) > 1:
                ax.legend(fontsize=8)
        for j in range(n, nrows * ncols):
            axes[j // ncols][j % ncols].set_visible(False)
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        out_dir = os.path.dirname(os.path.abspath(out))
        fd, tmp = tempfile.mkstemp(prefix=".plot_metrics.", suffix="." + fmt, dir=out_dir)
        try:
            with os.fdopen(fd, "wb") as f:
                fig.savefig(f, format=fmt, dpi=100)
            os.chmod(tmp, 0o644)
            os.replace(tmp, out)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    finally:
        plt.close(fig)


def _pos_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return v


def _key_list(s: str) -> list[str]:
    keys = [k.strip() for k in s.split(",")]
    if not s.strip() or any(not k for k in keys):
        raise argparse.ArgumentTypeError(f"expected comma-separated key names, got {s!r}")
    return list(dict.fromkeys(keys))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog=PROG,
        description="Plot metrics.jsonl curves (one subplot per key, x = iteration, runs "
                    "overlaid and labelled by directory) to an image. Needs matplotlib.")
    ap.add_argument("--metrics", nargs="+", required=True, metavar="FILE",
                    help="one or more metrics.jsonl files (a run directory also works)")
    ap.add_argument("--out", required=True, help="output image (.png; .pdf/.svg also work)")
    ap.add_argument("--keys", type=_key_list, default=None,
                    help="comma-separated keys to plot, e.g. reward,accuracy,"
                         "response_length_mean (default: every numeric key except "
                         f"{'/'.join(EXCLUDED_KEYS)}, at most {MAX_SUBPLOTS})")
    ap.add_argument("--smooth", type=_pos_int, default=1, metavar="N",
                    help="trailing moving average over N logged points (default 1: none)")
    ap.add_argument("--title", default=None, help="figure title")
    return ap


def main(argv: Optional[list[str]] = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    ext = os.path.splitext(args.out)[1].lower().lstrip(".")
    if ext and ext not in FORMATS:
        ap.error(f"--out {args.out!r}: unsupported extension '.{ext}' "
                 f"(use {', '.join('.' + f for f in FORMATS)})")
    fmt = ext or "png"
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        ap.error(f"--out {args.out!r}: directory {out_dir!r} does not exist")

    paths = []
    for p in args.metrics:
        if os.path.isdir(p):
            p = os.path.join(p, "metrics.jsonl")
        paths.append(p)
    try:
        runs = [read_metrics(p) for p in paths]
    except MetricsError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    for p, records in zip(paths, runs):
        if not records:
            print(f"{PROG}: warning: {p} has no records", file=sys.stderr)

    if args.keys is None:
        keys = default_keys(runs)
        if len(keys) > MAX_SUBPLOTS:
            print(f"{PROG}: warning: {len(keys)} numeric keys; plotting the first "
                  f"{MAX_SUBPLOTS} (skipped: {', '.join(keys[MAX_SUBPLOTS:])}); "
                  f"choose others with --keys", file=sys.stderr)
            keys = keys[:MAX_SUBPLOTS]
    else:
        keys = []
        for k in args.keys:
            if any(series(r, k)[0] for r in runs):
                keys.append(k)
            else:
                print(f"{PROG}: warning: key '{k}' has no numeric values in any metrics file; "
                      f"skipped", file=sys.stderr)
    if not keys:
        print(f"{PROG}: error: nothing to plot: no numeric keys found in "
              f"{', '.join(paths)}", file=sys.stderr)
        return 1

    try:
        plot(runs, run_labels(paths), keys, args.out, smooth_window=args.smooth,
             title=args.title, fmt=fmt)
    except OSError as e:
        print(f"{PROG}: error: cannot write {args.out}: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.out} ({len(keys)} plot{'s' if len(keys) != 1 else ''}: "
          f"{', '.join(keys)}; {len(runs)} run{'s' if len(runs) != 1 else ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
