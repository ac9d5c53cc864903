"""Tool calls inside rollouts (rl/tools.py): the sandboxed Python tool, and the rollout loop
that stops at the trigger, inserts the output and goes on (a scripted model: byte tokens)."""

import pytest

from megatron_k15.data.tokenizer import ByteTokenizer
from megatron_k15.generation.recompute import GenerationResult
from megatron_k15.generation.replay_buffer import TOOL_SEGMENT, Trajectory, loss_mask
from megatron_k15.generation.stop_strings import StopStrings
from megatron_k15.rl.tools import TOOL_STOP_REASON, TOOL_TRIGGER, PythonTool, ToolRunner, ToolUse, python_cells
from megatron_k15.rl.trainer import RolloutSettings, rollout

CALL = "```python\nprint(6*7)\n```\n" + TOOL_TRIGGER
FINAL = "so \\boxed{42}"
OUT = "\n42\n```\n"  # what the tool inserts after CALL


def test_python_tool_runs_the_last_block_after_the_earlier_ones_silently():
    tool = PythonTool(timeout_s=5.0)
    assert tool("```python\nprint(2 ** 10)\n```\n```output") == "\n1024\n```\n"
    two = "```python\nx = 5\nprint('hidden')\n```\n```output\nhidden\n```\nthen\n```python\nprint(x * 2)\n```\n"
    assert tool(two) == "\n10\n```\n"  # x carried over, the first cell's print not repeated
    assert python_cells(two) == ["x = 5\nprint('hidden')\n", "print(x * 2)\n"]
    # an earlier cell's error does not stop the later ones (as in a notebook)
    assert tool("```python\ny = 1\n1 / 0\n```\n```python\nprint(y)\n```") == "\n1\n```\n"
    # a cell may rebind exec / compile / globals, and the last one may start with __future__
    shadow = "```python\nfrom re import *\nx = 3\n```\n```python\ny = x + 1\n```\n```python\n" \
             "from __future__ import annotations\nprint(x, y)\n```"
    assert tool(shadow) == "\n3 4\n```\n"


def test_a_cell_that_ran_out_of_time_is_not_run_again():
    """An earlier cell whose output shows a timeout (or memory, or cut output) would spend
    every later call's limits: it is left out, the others still run."""
    tool = PythonTool(timeout_s=1.0)
    first = "```python\nz = 2\n```\n```output\n\n```\n```python\nwhile True: pass\n```\n```output"
    out = tool(first)
    assert out == "\nTimeoutError: the code ran for more than 1 s\n```\n"
    later = first + out + "```python\nprint(z * 21)\n```\n```output"
    assert python_cells(later) == ["z = 2\n", "print(z * 21)\n"]
    assert tool(later) == "\n42\n```\n"


def test_python_tool_reports_errors_timeouts_and_cuts_long_output():
    tool = PythonTool(timeout_s=1.0, max_output_chars=20)
    assert PythonTool()("```python\nprint('so far')\nprint(1 / 0)\n```") == \
        "\nso far\nZeroDivisionError: division by zero\n```\n"
    assert tool("```python\nwhile True: pass\n```") == "\nTimeoutError: the code ran for more than 1 s\n```\n"
    assert tool("```python\nprint('a' * 100)\n```") == "\n" + "a" * 20 + "\n... (output cut)\n```\n"
    assert tool("no code here ```output").startswith("\nSyntaxError: no ```python block")
    # the sandbox keeps the code off the network and the caller's files
    out = tool("```python\nimport os\nprint(os.path.exists(%r))\n```" % __file__)
    assert out == "\nFalse\n```\n"


class ScriptedModel:
    """The engines' ``generate`` for a "model" that writes, after its prompt, ``blocks[0]``, then
    after each tool output the next block, and EOS after the last (or after a block it finished
    that got no output). Byte tokens: one character per token; log-prob -1 each. The detector
    decides where a request stops, as in the engines."""

    def __init__(self, tok, prompt, blocks):
        self.tok, self.prompt, self.blocks = tok, prompt, blocks
        self.calls = []

    def _next(self, text):
        resp = text[len(self.prompt):]
        n_out = resp.count(OUT)
        own = resp[resp.rfind(OUT) + len(OUT):] if n_out else resp
        block = self.blocks[min(n_out, len(self.blocks) - 1)]
        return block[len(own)] if len(own) < len(block) else None

    def generate(self, prompts, budgets, params, generators, eos_ids, detector_factory, on_finish=None):
        self.calls.append(list(budgets))
        results = []
        for j, (ids, budget) in enumerate(zip(prompts, budgets)):
            det = detector_factory() if detector_factory is not None else None
            text = self.tok.decode(ids)
            res = GenerationResult([], [], "length")
            while len(res.output_ids) < budget:
                ch = self._next(text)
                tok = self.tok.eos_id if ch is None else self.tok.encode(ch)[0]
                res.output_ids.append(tok)
                res.output_logprobs.append(-1.0)
                if ch is None:
                    res.stop_reason = "eos"
                    break
                text += ch
                why = det.push(tok) if det is not None else None
                if why:
                    res.stop_reason = why
                    break
            if on_finish is not None:
                on_finish(j, res)
            results.append(res)
        return results


def _setup(blocks, max_calls=4, **settings):
    tok = ByteTokenizer()
    prompt = "Q: 6*7?\n"
    model = ScriptedModel(tok, prompt, blocks)
    ran = []

    def tool(text):
        ran.append(text)
        return PythonTool()(text)

    s = RolloutSettings(repeat_detection=False, tools=ToolUse(
        tok, StopStrings(tok, [TOOL_TRIGGER], reason=TOOL_STOP_REASON), ToolRunner(tool, 2), max_calls), **settings)
    traj = Trajectory("q", tok.encode(prompt), group_id="g")
    return tok, model, s, traj, ran


def test_rollout_inserts_the_tool_output_and_goes_on():
    tok, model, s, t, ran = _setup([CALL, CALL, FINAL], max_tokens=200)
    finals = []
    rollout(model, [t], 0, s, [tok.eos_id], on_final=lambda i, ids: finals.append((i, ids)))
    text = tok.decode(t.response_ids)
    assert text == CALL + OUT + CALL + OUT + FINAL and t.stop_reason == "eos"
    assert t.extra["tool_calls"] == 2 and len(ran) == 2 and len(model.calls) == 3
    # the inserted tokens: tagged, log-prob 0, out of the loss; the model's: -1 and in it
    tool_at = [i for i, s_ in enumerate(t.segment_ids) if s_ == TOOL_SEGMENT]
    first = len(CALL)
    assert tool_at[:len(OUT)] == list(range(first, first + len(OUT))) and t.tool_tokens == 2 * len(OUT)
    assert all(t.logprobs[i] == 0.0 for i in tool_at)
    mask = loss_mask(t, 0)
    assert mask.sum() == t.response_len - 2 * len(OUT) and all(mask[i] == 0 for i in tool_at)
    assert loss_mask(t, 0, include_old_segments=True).sum() == mask.sum()
    assert t.segments() == [(0, 0, t.response_len)] and t.last_iteration == 0
    # the whole response once, when it is final; budgets: what was left of the 200
    assert finals == [(0, t.response_ids)]
    assert model.calls == [[200], [200 - len(CALL + OUT)], [200 - 2 * len(CALL + OUT)]]


def test_a_call_starts_while_the_engine_decodes_the_others():
    """The tool starts on a response as soon as its request stops (the engine's on_finish),
    not when the engine's round is over: here the second request's whole generation happens
    after the first one's call began."""
    import threading

    tok = ByteTokenizer()
    prompt = "Q: 6*7?\n"
    events, started = [], threading.Event()

    def tool(text):
        events.append("call")
        started.set()
        return "\n42\n```\n"

    class TwoRequests(ScriptedModel):
        def generate(self, prompts, budgets, params, generators, eos_ids, detector_factory, on_finish=None):
            if len(prompts) == 2:  # the first round: request 0 calls, then request 1 decodes
                first = super().generate(prompts[:1], budgets[:1], params, generators, eos_ids, detector_factory,
                                         on_finish)
                assert started.wait(10)
                events.append("request 1 decodes")
                rest = super().generate(prompts[1:], budgets[1:], params, generators, eos_ids, detector_factory,
                                        lambda j, res: on_finish(j + 1, res))
                return first + rest
            return super().generate(prompts, budgets, params, generators, eos_ids, detector_factory, on_finish)

    model = TwoRequests(tok, prompt, [CALL, FINAL])
    s = RolloutSettings(repeat_detection=False, max_tokens=200, tools=ToolUse(
        tok, StopStrings(tok, [TOOL_TRIGGER], reason=TOOL_STOP_REASON), ToolRunner(tool, 2)))
    trajs = [Trajectory("q", tok.encode(prompt), group_id="g", sample_index=k) for k in range(2)]
    rollout(model, trajs, 0, s, [tok.eos_id])
    assert events[:2] == ["call", "request 1 decodes"]
    assert [tok.decode(t.response_ids) for t in trajs] == [CALL + OUT + FINAL] * 2


def test_a_tool_that_fails_itself_answers_with_the_error():
    def broken(text):
        raise OSError("too many open files")

    assert ToolRunner(broken).run(["x"]) == ["\nError: the tool failed (OSError: too many open files)\n```\n"]


def test_calls_past_the_limit_are_not_answered():
    tok, model, s, t, ran = _setup([CALL, CALL, FINAL], max_calls=1, max_tokens=200)
    rollout(model, [t], 0, s, [tok.eos_id])
    # the second trigger is not watched: the model writes it and goes on (here: it ends)
    assert tok.decode(t.response_ids) == CALL + OUT + CALL and t.stop_reason == "eos"
    assert t.extra["tool_calls"] == 1 and len(ran) == 1


def test_the_budget_cuts_the_tool_output():
    n = len(CALL) + 3
    tok, model, s, t, _ = _setup([CALL, FINAL], max_tokens=n)
    finals = []
    rollout(model, [t], 0, s, [tok.eos_id], on_final=lambda i, ids: finals.append(ids))
    assert tok.decode(t.response_ids) == CALL + OUT[:3] and t.response_len == n
    assert t.stop_reason == "length" and t.tool_tokens == 3 and finals == [t.response_ids]


def test_a_trigger_that_takes_the_last_of_the_budget_ends_the_response():
    tok, model, s, t, ran = _setup([CALL, FINAL], max_tokens=len(CALL))
    finals = []
    rollout(model, [t], 0, s, [tok.eos_id], on_final=lambda i, ids: finals.append(ids))
    assert tok.decode(t.response_ids) == CALL and t.stop_reason == "length"
    assert ran == [] and "tool_calls" not in t.extra and finals == [t.response_ids]


@pytest.mark.parametrize("segment", [5, 9, 40])
def test_partial_segments_with_tool_calls_equal_one_uninterrupted_rollout(segment):
    """Segments of ``segment`` tokens (the tool's count too, an output is inserted whole): the
    trigger may span a segment boundary and a segment may end right after a tool output;
    iteration by iteration the trajectory grows into the same response."""
    tok, model, s, whole, _ = _setup([CALL, CALL, FINAL], max_tokens=200)
    rollout(model, [whole], 0, s, [tok.eos_id])
    tok, model, s, t, _ = _setup([CALL, CALL, FINAL], max_tokens=200, segment_tokens=segment)
    it = 0
    while t.stop_reason in (None, "partial"):
        before = t.response_len
        rollout(model, [t], it, s, [tok.eos_id])
        assert t.response_len - before <= segment + len(OUT) - 1
        it += 1
    assert t.response_ids == whole.response_ids and t.stop_reason == "eos"
    assert [i for i, x in enumerate(t.segment_ids) if x == TOOL_SEGMENT] == \
        [i for i, x in enumerate(whole.segment_ids) if x == TOOL_SEGMENT]
    assert t.last_iteration == it - 1 and len(t.segments()) == it
    assert loss_mask(t, it - 1, include_old_segments=True).sum() == t.response_len - t.tool_tokens


def test_a_primed_stop_string_does_not_fire_again():
    """A resumed request's detector is fed its earlier tokens; an occurrence among them (the
    trigger answered before) must not stop the first new token, a new one must."""
    tok = ByteTokenizer()
    m = StopStrings(tok, ["```output"], reason="tool")()
    assert m.window == 10
    for b in tok.encode("x```output"):  # priming: the verdicts are ignored
        m.push(b)
    assert m.push(tok.encode("\n")[0]) is None  # "```output\n" holds it, but it was seen already
    m2 = StopStrings(tok, ["```output"])()
    for b in tok.encode("x```outpu"):
        m2.push(b)
    assert m2.push(tok.encode("t")[0]) == "stop"  # completed by the new token
    for stop in ("é", "答案", "x😀"):  # the new token completes a character of several bytes
        m4 = StopStrings(tok, [stop])()
        assert [m4.push(b) for b in tok.encode("a" + stop)][-1] == "stop", stop
    m3 = StopStrings(tok, ["ab"])()
    assert [m3.push(b) for b in tok.encode("abxab")] == [None, "stop", None, None, "stop"]


def test_evaluation_calls_the_tool_and_grades_the_final_answer():
    """tools/evaluate.py's path: a response that calls the tool is graded on its whole text (the
    boxed answer after the output) and records its calls; without the tool the same model
    stops at the trigger's imagined output and gives no answer."""
    from megatron_k15.rl.evaluation import evaluate

    tok, model, s, _, _ = _setup([CALL, FINAL])
    recs = [{"id": "m0", "prompt": "Q: 6*7?\n", "task": "math", "answer": "42"}]
    res = evaluate(None, tok, recs, [tok.encode(recs[0]["prompt"])], max_new_tokens=200, eos_ids=[tok.eos_id],
                   n_samples=2, temperature=1.0, generator=model, tools=s.tools)
    samples = res["results"][0]["samples"]
    assert [x["text"] for x in samples] == [CALL + OUT + FINAL] * 2 and res["accuracy"] == 1.0
    assert [x["tool_calls"] for x in samples] == [1, 1] and samples[0]["length"] == len(CALL + OUT + FINAL) + 1
    res = evaluate(None, tok, recs, [tok.encode(recs[0]["prompt"])], max_new_tokens=200, eos_ids=[tok.eos_id],
                   generator=ScriptedModel(tok, "Q: 6*7?\n", [CALL, FINAL]))
    assert res["results"][0]["samples"][0]["text"] == CALL and res["accuracy"] == 0.0


def test_tool_flags_are_checked():
    import argparse

    from megatron_k15.rl.tools import add_tool_args, check_tool_args

    p = argparse.ArgumentParser()
    add_tool_args(p)
    p.add_argument("--stop-strings", nargs="+")
    p.add_argument("--stop", nargs="+")
    ok = p.parse_args(["--tool", "python"])
    assert check_tool_args(ok) is None and check_tool_args(p.parse_args([])) is None
    assert "--max-tool-calls must be >= 1" in check_tool_args(p.parse_args(["--tool", "python", "--max-tool-calls", "0"]))
    assert "--tool-timeout" in check_tool_args(p.parse_args(["--tool", "python", "--tool-timeout", "0"]))
    assert "--tool-output-max-chars" in check_tool_args(p.parse_args(["--tool", "python", "--tool-output-max-chars", "3"]))
    assert "--tool-workers" in check_tool_args(p.parse_args(["--tool", "python", "--tool-workers", "0"]))
    bad = p.parse_args(["--tool", "python", "--stop-strings", "</answer>", "x```output", "--stop", "```output"])
    assert check_tool_args(bad).startswith("--stop-strings: a stop string containing")
    assert check_tool_args(bad, stop_flag="--stop").startswith("--stop: a stop string containing")
    # (without --tool the stop strings are the user's business)
    assert check_tool_args(p.parse_args(["--stop-strings", "```output"])) is None
