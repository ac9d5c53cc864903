"""Weights & Biases logging with Megatron-LM's flags (``--wandb-project``, ``--wandb-exp-name``,
``--wandb-entity``, ``--wandb-save-dir``); optional, like TensorBoard.

Rank 0 logs the scalars of every logged iteration (the same as ``metrics.jsonl`` and
TensorBoard) against an ``iteration`` axis. The run id is kept in
``<save dir>/wandb_run_id.txt``: a job that resumes from a checkpoint (start iteration > 0)
continues the same W&B run, so a preempted and requeued training shows as one run; a fresh
start opens a new run. Because the axis is a logged metric, not W&B's own step counter, the
iterations a resumed job repeats are logged again instead of being dropped.
"""

from __future__ import annotations

import importlib.util
import os
import secrets
from typing import Optional

RUN_ID_FILE = "wandb_run_id.txt"
_FLAGS = ("wandb_exp_name", "wandb_entity", "wandb_save_dir")


def add_wandb_args(g) -> None:
    g.add_argument("--wandb-project", default=None,
                   help="log to Weights & Biases under this project (needs the wandb package)")
    g.add_argument("--wandb-exp-name", default=None, help="W&B run name")
    g.add_argument("--wandb-entity", default=None, help="W&B team or user")
    g.add_argument("--wandb-save-dir", default=None,
                   help="W&B files and the run id (default: --save, else --tensorboard-dir, else ./wandb)")


def check_wandb_args(args) -> Optional[str]:
    """The problem with the --wandb-* flags, or None."""
    if getattr(args, "wandb_project", None) is None:
        given = [f for f in _FLAGS if getattr(args, f, None) is not None]
        if given:
            return f"--{given[0].replace('_', '-')} needs --wandb-project"
        return None
    if importlib.util.find_spec("wandb") is None:
        return ("--wandb-project needs the wandb package (pip install wandb); or drop it and log "
                "with --tensorboard-dir")
    return None


def _jsonable(value):
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "to_dict"):
        return value.to_dict()
    return str(value)


class WandbRun:
    """One W&B run (rank 0 only); ``log(iteration, metrics)`` and ``finish()``."""

    def __init__(self, args, start_iteration: int):
        import wandb

        save_dir = (args.wandb_save_dir or getattr(args, "save", None)
                    or getattr(args, "tensorboard_dir", None) or "wandb")
        os.makedirs(save_dir, exist_ok=True)
        id_path = os.path.join(save_dir, RUN_ID_FILE)
        run_id = None
        if start_iteration > 0 and os.path.isfile(id_path):
            with open(id_path) as f:
                run_id = f.read().strip() or None
        if run_id is None:
            run_id = secrets.token_hex(8)
            tmp = id_path + ".tmp"
            with open(tmp, "w") as f:
                f.write(run_id + "\n")
            os.replace(tmp, id_path)
        self.run = wandb.init(project=args.wandb_project, entity=args.wandb_entity,
                              name=args.wandb_exp_name, dir=save_dir, id=run_id, resume="allow",
                              config={k: _jsonable(v) for k, v in sorted(vars(args).items())})
        self.run.define_metric("iteration")
        self.run.define_metric("*", step_metric="iteration")

    def log(self, iteration: int, scalars: dict) -> None:
        """``scalars``: numeric metrics only (``MetricsLogger.log`` filters them)."""
        self.run.log({"iteration": iteration, **scalars})

    def finish(self) -> None:
        self.run.finish()
