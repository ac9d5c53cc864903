"""Tool calls inside rollouts: the policy runs Python while it reasons (tool-integrated reasoning).

The format is the one Qwen2.5-Math-Instruct's tool-integrated reasoning (and ReTool, SimpleTIR)
use. The model writes a fenced python block, closes it and opens an output block::

    ```python
    print(2 ** 10)
    ```
    ```output

Generation stops at the trigger ``"```output"`` (``--tool python``). The trajectory's python
blocks run in the code sandbox of ``rewards.code`` (no network, a private filesystem, CPU, memory
and output limits) as notebook cells: the earlier blocks of the same response run again first
with their output hidden, so variables carry over (except those that ran out of time, memory or
output: they would again), then the last block prints; the call's time limit covers them all. Its stdout,
cut to ``--tool-output-max-chars``, then the last line of the error when it failed
(``ZeroDivisionError: division by zero``, ``TimeoutError: ...``), is written into the response
and the output block closed::

    \\n1024\\n```\\n

and generation resumes after it, under the same policy, within the same response budget.

The inserted tokens are not the policy's: they are tagged ``replay_buffer.TOOL_SEGMENT``, carry
a log-prob of 0 and never enter the loss; they do count toward ``--rollout-max-tokens`` (they
are part of the sequence the trainer runs). After ``--max-tool-calls`` calls the trigger is
no longer watched: the model goes on writing, and whatever output it imagines gets no answer.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Optional

__all__ = ["PythonTool", "TOOL_STOP_REASON", "TOOL_TRIGGER", "ToolRunner", "ToolUse", "add_tool_args",
           "check_tool_args", "python_cells", "tool_from_args", "tool_use_from_args"]

TOOL_TRIGGER = "```output"
TOOL_STOP_REASON = "tool"  # what the trigger's detector returns to the engines (never a trajectory's)
_PYTHON_BLOCK = re.compile(r"```python[ \t]*\n(.*?)```", re.DOTALL)

# earlier cells run first, silently, each on its own (an error ends that cell, as in a notebook);
# then the last one (compiled on its own, so it may start with a __future__ import)
_CELLS_PROGRAM = '''import builtins as _k15_b, contextlib as _k15_ctx, io as _k15_io
for _k15_cell in %r:
    with _k15_ctx.redirect_stdout(_k15_io.StringIO()), _k15_ctx.redirect_stderr(_k15_io.StringIO()):
        try:
            _k15_b.exec(_k15_b.compile(_k15_cell, "<cell>", "exec"), _k15_b.globals())
        except BaseException:
            pass
_k15_b.exec(_k15_b.compile(%r, "<cell>", "exec"), _k15_b.globals())
'''
# the lines an output shows when its cell ran out of time, memory or output; such a cell is not
# run again (it would spend every later call's limits)
_TIMEOUT, _MEMORY, _CUT = "TimeoutError: the code ran for more than", "MemoryError: the code used more than", \
    "... (output cut)"


def output_block(text: str) -> str:
    """What is inserted after the trigger: ``text`` and the closing fence."""
    return f"\n{text}\n```\n"


def python_cells(text: str) -> list[str]:
    """The closed ```python blocks of ``text``, in order, less the earlier ones whose output
    (the text up to the next block) shows they ran out of time, memory or output."""
    found = list(_PYTHON_BLOCK.finditer(text))
    keep = [m.group(1) for m, nxt in zip(found, found[1:])
            if not any("\n" + mark in text[m.end():nxt.start()] for mark in (_TIMEOUT, _MEMORY, _CUT))]
    return keep + [found[-1].group(1)] if found else []


@dataclass
class PythonTool:
    """Runs the last python block of a response (its earlier blocks first, silently) in the
    sandbox and returns the text to insert after the trigger.

    ``timeout_s``: wall-clock limit of one call; ``max_output_chars``: what the code printed is
    cut to this many characters (its head, then a note; an error's line is kept whole);
    ``memory_mb``: the sandbox's memory limit."""

    timeout_s: float = 5.0
    max_output_chars: int = 1024
    memory_mb: int = 1024

    def program(self, response: str) -> Optional[str]:
        """What one call runs, or None when the response holds no closed python block."""
        cells = python_cells(response)
        if not cells:
            return None
        return _CELLS_PROGRAM % (cells[:-1], cells[-1]) if len(cells) > 1 else cells[-1]

    def __call__(self, response: str) -> str:
        from megatron_k15.rewards.code import run_tests

        program = self.program(response)
        if program is None:
            return self.format("", "SyntaxError: no ```python block to run before ```output")
        res = run_tests(program, [{"input": "", "output": ""}], self.timeout_s, memory_mb=self.memory_mb,
                        output_limit=max(4096, 4 * self.max_output_chars), keep_output=True)
        r = res["results"][0] if res["results"] else {"status": res["status"]}
        status = r["status"]
        error = ""
        if status == "timeout":
            error = f"{_TIMEOUT} {self.timeout_s:g} s"
        elif status == "memory":
            error = f"{_MEMORY} {self.memory_mb} MiB"
        elif status == "error":
            lines = [ln for ln in r.get("stderr", "").splitlines() if ln.strip()]
            error = lines[-1] if lines else "Error: the code failed"
        elif status not in ("ok", "failed", "output_limit"):  # "failed": it ran (there is no test to pass)
            error = f"Error: the sandbox could not run the code ({status})"
        return self.format(r.get("stdout", ""), error, cut=status == "output_limit")

    def format(self, output: str, error: str = "", cut: bool = False) -> str:
        """The text inserted after the trigger: the output (cut to ``max_output_chars``), the
        error's line whole, and the closing fence."""
        output = output.rstrip("\n")
        if cut or len(output) > self.max_output_chars:
            output = f"{output[:self.max_output_chars]}\n{_CUT}"
        if error:
            output = f"{output}\n{error}" if output else error
        return output_block(output)


class ToolRunner:
    """Runs a tool for ranks that decode requests together, those given the same ``replica``
    number (constructing one is a collective: every rank does). The first rank of each replica
    runs the calls, ``workers`` at a time in threads, as soon as they are submitted (while the
    engine decodes the other requests); ``collect`` hands every rank of the replica the same
    outputs (an output can depend on time or chance, and every rank that decodes a request must
    append the same tokens)."""

    def __init__(self, tool: Callable[[str], str], workers: int = 1, replica: int = 0):
        self.tool, self.workers = tool, max(1, int(workers))
        self.group, self.first, self._pool = None, 0, None
        import torch.distributed as dist

        self._dist = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if not self._dist:
            return
        numbers = [None] * dist.get_world_size()
        dist.all_gather_object(numbers, replica)
        members: dict = {}
        for rank, k in enumerate(numbers):
            members.setdefault(k, []).append(rank)
        for k in sorted(members):  # every rank creates every group, in the same order
            # (gloo: host objects only, and no NCCL watchdog while the first rank runs the calls)
            g = dist.new_group(members[k], backend="gloo") if len(members[k]) > 1 else None
            if k == replica:
                self.group = g
        self.first = members[replica][0]

    @property
    def runs_calls(self) -> bool:
        import torch.distributed as dist

        return not self._dist or dist.get_rank() == self.first

    def submit(self, text: str):
        """Start a call on ``text`` (a response); returns its handle (None on the ranks that
        do not run calls)."""
        if not self.runs_calls:
            return None
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="k15-tool")
        return self._pool.submit(self._call, text)

    def _call(self, text: str) -> str:
        """A call that fails itself (not the code it runs) answers with the error: raising here
        would leave the replica's other ranks waiting in ``collect``."""
        try:
            return self.tool(text)
        except Exception as e:  # noqa: BLE001
            return output_block(f"Error: the tool failed ({type(e).__name__}: {e})")

    def collect(self, handles: list) -> list:
        """The outputs of the submitted calls, in order, on every rank of the replica (a
        collective over it)."""
        out = [h.result() for h in handles] if self.runs_calls else None
        if self.group is not None:
            import torch.distributed as dist

            box = [out]
            dist.broadcast_object_list(box, src=self.first, group=self.group)
            out = box[0]
        return out

    def run(self, texts: list) -> list:
        return self.collect([self.submit(t) for t in texts])


@dataclass
class ToolUse:
    """What ``rl.trainer.rollout`` needs for tool calls: the tokenizer (responses to text, the
    tool's output to tokens), the trigger's detector factory, the ``ToolRunner`` and the calls
    allowed per trajectory."""

    tokenizer: object
    trigger: Callable[[], object]
    runner: ToolRunner
    max_calls: int = 4


def add_tool_args(g) -> None:
    g.add_argument("--tool", choices=["none", "python"], default="none",
                   help="python: a rollout that writes ```output after a ```python block stops there, the "
                        "response's python blocks run in the code sandbox (as notebook cells), and the output is "
                        "inserted and generation goes on (tool-integrated reasoning; rl/tools.py); the inserted "
                        "tokens are not trained on")
    g.add_argument("--max-tool-calls", type=int, default=4, help="with --tool: calls per response")
    g.add_argument("--tool-timeout", type=float, default=5.0, help="with --tool: seconds per call")
    g.add_argument("--tool-output-max-chars", type=int, default=1024,
                   help="with --tool: what the code printed is cut to this many characters")
    g.add_argument("--tool-workers", type=int, default=8,
                   help="with --tool: calls run at once (threads, each waiting on a sandboxed process) by the "
                        "first rank of each model replica, while the engine decodes the other requests")


def check_tool_args(args, stop_flag: str = "--stop-strings") -> Optional[str]:
    """The tool flags' problem, or None; ``stop_flag``: the program's stop-strings flag."""
    if getattr(args, "tool", "none") == "none":
        return None
    if args.max_tool_calls < 1:
        return f"--max-tool-calls must be >= 1 with --tool {args.tool}, got {args.max_tool_calls}"
    if not args.tool_timeout > 0:
        return f"--tool-timeout must be > 0 seconds, got {args.tool_timeout}"
    if args.tool_workers < 1:
        return f"--tool-workers must be >= 1, got {args.tool_workers}"
    if args.tool_output_max_chars < 16:
        return f"--tool-output-max-chars must be >= 16, got {args.tool_output_max_chars}"
    if any(TOOL_TRIGGER in s for s in getattr(args, stop_flag.lstrip("-").replace("-", "_"), None) or ()):
        return f"{stop_flag}: a stop string containing {TOOL_TRIGGER!r} would end the responses that call --tool"
    return None


def tool_from_args(args) -> Optional[PythonTool]:
    if getattr(args, "tool", "none") == "none":
        return None
    return PythonTool(timeout_s=args.tool_timeout, max_output_chars=args.tool_output_max_chars)


def tool_use_from_args(args, tokenizer, replica: int = 0) -> Optional[ToolUse]:
    """``--tool``'s ``ToolUse`` (None without one) for the ranks that decode the requests of
    ``replica`` together (``ToolRunner``: a collective under torch.distributed)."""
    tool = tool_from_args(args)
    if tool is None:
        return None
    from megatron_k15.generation.stop_strings import StopStrings

    return ToolUse(tokenizer, StopStrings(tokenizer, [TOOL_TRIGGER], reason=TOOL_STOP_REASON),
                   ToolRunner(tool, args.tool_workers, replica), args.max_tool_calls)
