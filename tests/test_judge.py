"""The generative reward model (megatron_k15/rewards/judge.py): verdict parsing, which answers
are sent to the judge in each mode, how its verdicts enter the RL rewards, and the judge run by
the generation engine in several layouts against a full-recompute generation of the same
prompts on one rank."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from megatron_k15.data.tokenizer import ByteTokenizer
from megatron_k15.rewards.judge import (
    DEFAULT_JUDGE_TEMPLATE,
    GenerativeJudge,
    check_judge_args,
    check_judge_template,
    judge_metrics,
    parse_verdict,
)
from megatron_k15.rewards.reasoning import ReasoningTags
from megatron_k15.testing import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("text,verdict", [
    ("The values agree.\nVerdict: correct", True),
    ("Verdict: incorrect", False),
    ("**Verdict:** Correct.", True),
    ("**Verdict**: **Correct**", True),
    ("> verdict - no", False),
    ('{"reasoning": "same", "correct": true}', True),
    ('{"verdict": "incorrect"}', False),
    ("Verdict: correct\nWait: 1/3 != 0.3.\nVerdict: incorrect", False),  # the last counts
    ("It is correct.", None),  # no verdict line
    ("The student wrote 'Verdict: correct' in the answer.", None),  # quoted, not a verdict line
    ("Verdict: correct-ish", None),
    ("overdict: yes", None),
    ("", None),
    ("Verdict: correctness unclear", None),
])
def test_parse_verdict(text, verdict):
    assert parse_verdict(text) is verdict


def test_template_check_names_what_is_wrong():
    check_judge_template(DEFAULT_JUDGE_TEMPLATE)
    with pytest.raises(ValueError, match=r"missing \['reference'\]"):
        check_judge_template("{question} {response}")
    with pytest.raises(ValueError, match=r"unknown fields \['answer'\]"):
        check_judge_template("{question} {reference} {response} {answer}")
    with pytest.raises(ValueError, match="literal braces"):
        check_judge_template("{question} {reference} {response} {")


class _ScriptedGenerator:
    """Stands in for the engine: answers 'Verdict: correct' when the graded response inside the
    judge prompt is one of ``accepted``; records the prompts it saw."""

    def __init__(self, tok, accepted):
        self.tok, self.accepted, self.prompts, self.released = tok, accepted, [], 0

    def generate(self, prompts, max_new_tokens, params, generators, eos_ids):
        assert params.temperature == 0.0  # judges decode greedily
        out = []
        for ids in prompts:
            text = self.tok.decode(ids)
            self.prompts.append(text)
            response = text.split("Student's answer:\n")[1].split("\n\nThink")[0]
            verdict = "Verdict: correct" if response in self.accepted else (
                "no idea" if response == "???" else "Verdict: incorrect")
            cut = response == "long"  # the judge runs out of tokens, mid-way to a verdict
            out.append(SimpleNamespace(output_ids=self.tok.encode(f"Let me compare.\n{verdict}"),
                                       stop_reason="length" if cut else "eos"))
        return out

    def release(self):
        self.released += 1


def _judge(accepted, mode="fallback", tasks=("math",)):
    tok = ByteTokenizer()
    gen = _ScriptedGenerator(tok, accepted)
    return GenerativeJudge(gen, tok.encode, tok.decode, [tok.eos_id], max_new_tokens=32,
                           tasks=frozenset(tasks), mode=mode), gen


MATH = {"id": "m", "prompt": "What is 1/2 as a decimal?", "task": "math", "answer": "0.5"}
CODE = {"id": "c", "prompt": "print 1", "task": "code", "tests": [{"input": "", "output": "1"}]}


def test_fallback_asks_only_about_answers_the_rules_reject():
    judge, gen = _judge(accepted={"one half, i.e. 0.50000"})
    records = [MATH, MATH, MATH, MATH, CODE]
    graded = ["\\boxed{0.5}", "one half, i.e. 0.50000", "\\boxed{0.4}", None, "print(2)"]
    rule = [1.0, 0.0, 0.0, 0.0, 0.0]
    new, judgements = judge.regrade(records, graded, rule)
    # the rule's correct answer is kept; the equivalent form the rule missed is credited; a wrong
    # answer stays wrong; no answer (still reasoning) and other tasks are not sent
    assert new == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert len(gen.prompts) == 2 and gen.released == 1
    assert gen.prompts[0] == DEFAULT_JUDGE_TEMPLATE.format(
        question=MATH["prompt"], reference="0.5", response="one half, i.e. 0.50000")
    assert [(j.index, j.verdict, j.before, j.after) for j in judgements] == [(1, True, 0.0, 1.0), (2, False, 0.0, 0.0)]
    assert judgements[0].text == "Let me compare.\nVerdict: correct"
    assert judge_metrics(judgements, [r >= 1.0 for r in new]) == {
        "judge_calls": 2, "judge_correct_fraction": 0.5, "judge_unparsed_fraction": 0.0,
        "judge_truncated_fraction": 0.0, "judge_flipped": 1, "rule_accuracy": 1 / 5}


def test_fallback_keeps_partial_credit_and_skips_plugins_and_truncated_judges_are_wrong():
    judge, gen = _judge(accepted={"x", "long"}, tasks=("math", "code"))
    plugin = dict(MATH, reward_fn="my.module:grade")
    new, judgements = judge.regrade([CODE, CODE, plugin, MATH], ["y", "x", "x", "long"], [0.5, 0.5, 0.0, 0.0])
    # partial credit stays when the judge says no; full credit when it says yes; a record with
    # its own reward function is never judged; a judge cut off by its budget has no verdict
    assert new == [0.5, 1.0, 0.0, 0.0]
    assert [j.index for j in judgements] == [0, 1, 3]
    assert judgements[2].verdict is None and judgements[2].truncated
    stats = judge_metrics(judgements, [r >= 1.0 for r in new])
    assert stats["judge_truncated_fraction"] == pytest.approx(1 / 3) and stats["judge_flipped"] == 1
    assert stats["rule_accuracy"] == 0.0


def test_replace_grades_everything_of_its_tasks_and_no_verdict_is_wrong():
    judge, gen = _judge(accepted={"x"}, mode="replace", tasks=("math", "code"))
    new, judgements = judge.regrade([MATH, MATH, CODE], ["\\boxed{0.5}", "???", "x"], [1.0, 0.0, 0.0])
    assert new == [0.0, 0.0, 1.0]  # the judge overrules the rule both ways; unparsed -> 0
    stats = judge_metrics(judgements, [r >= 1.0 for r in new])
    assert stats["judge_calls"] == 3 and stats["judge_unparsed_fraction"] == pytest.approx(1 / 3)
    assert stats["judge_flipped"] == 2 and stats["rule_accuracy"] == pytest.approx(1 / 3)


def test_rl_score_uses_the_judge_on_the_graded_answer():
    """rl.trainer.score: the judge sees the text after </think>, its credit enters the length
    penalty as a correct answer would."""
    from megatron_k15.rl.trainer import score
    from megatron_k15.generation.replay_buffer import Trajectory

    tok = ByteTokenizer()
    responses = ["<think>long thoughts</think>one half", "<think>hmm</think>\\boxed{0.5}",
                 "<think>never finished", "<think>x</think>\\boxed{7}"]
    trajs = []
    for k, text in enumerate(responses):
        t = Trajectory(prompt_id="m", prompt_ids=tok.encode("q"), sample_index=k, start_iteration=0,
                       group_id="m@0")
        t.append_segment(tok.encode(text), [0.0] * len(tok.encode(text)), 0, "eos")
        trajs.append(t)
    judge, gen = _judge(accepted={"one half"})
    judgements = []
    rewards, correct = score(trajs, {"m": MATH}, tok, 0, reasoning_tags=ReasoningTags(), judge=judge,
                             length_penalty_weight=1.0, judgements=judgements)
    assert correct == [True, True, False, False]
    assert [(j.index, j.verdict) for j in judgements] == [(0, True), (3, False)]
    assert [p.split("Student's answer:\n")[1].split("\n\n")[0] for p in gen.prompts] == ["one half", "\\boxed{7}"]
    # Kimi's length reward over the group, judged answers counting as correct
    lengths = [t.response_len for t in trajs]
    lo, hi = min(lengths), max(lengths)
    lam = [0.5 - (n - lo) / (hi - lo) for n in lengths]
    want = [1 + lam[0], 1 + lam[1], min(0.0, lam[2]), min(0.0, lam[3])]
    assert rewards == pytest.approx(want)


class _ScriptedPolicy:
    """A policy generator answering each prompt with a fixed text."""

    def __init__(self, tok, answers):
        self.tok, self.answers = tok, answers

    def generate(self, prompts, max_new_tokens, params, generators, eos_ids, repeat_detector=None, on_finish=None):
        ids = [self.tok.encode(self.answers[self.tok.decode(p)]) for p in prompts]
        return [SimpleNamespace(output_ids=i, output_logprobs=[0.0] * len(i), stop_reason="eos")
                for i in ids]  # never calls on_finish: evaluate grades those after


def test_evaluate_with_a_judge_records_its_verdicts():
    from megatron_k15.rl.evaluation import evaluate

    tok = ByteTokenizer()
    records = [dict(MATH, id="a", prompt="half?"), dict(MATH, id="b", prompt="tenth?", answer="0.1"),
               dict(MATH, id="c", prompt="third?", answer="1/3")]
    policy = _ScriptedPolicy(tok, {"half?": "one half", "tenth?": "\\boxed{0.1}", "third?": "0.3"})
    judge, gen = _judge(accepted={"one half"})
    res = evaluate(None, tok, records, [tok.encode(r["prompt"]) for r in records], max_new_tokens=8,
                   eos_ids=[], generator=policy, judge=judge)
    a, b, c = (p["samples"][0] for p in res["results"])
    assert a["correct"] and a["judge_verdict"] is True and a["judge_text"].endswith("Verdict: correct")
    assert b["correct"] and "judge_verdict" not in b  # the rule accepted it: no call
    assert not c["correct"] and c["judge_verdict"] is False
    assert res["accuracy"] == pytest.approx(2 / 3)
    assert res["judge_calls"] == 2 and res["judge_flipped"] == 1 and len(gen.prompts) == 2


def test_flags_are_checked_before_any_work(tmp_path):
    ns = argparse.Namespace(reward_model_load=None, reward_model_tokenizer=None, reward_model_prompt=None,
                            reward_model_chat_template=False, reward_model_mode="replace",
                            reward_model_tasks="math", reward_model_max_tokens=1024)
    assert check_judge_args(ns) == "--reward-model-mode needs --reward-model-load DIR (the judge checkpoint)"
    ns.reward_model_mode, ns.reward_model_load = "fallback", str(tmp_path / "missing")
    assert "directory does not exist" in check_judge_args(ns)
    ns.reward_model_load = str(tmp_path)
    assert "--reward-model-load" in check_judge_args(ns) and "latest" in check_judge_args(ns)


# -- the judge on a real (tiny, random) model -------------------------------------------------
ITEMS = [({"prompt": "2+2?", "answer": "4"}, "four"), ({"prompt": "Area of a unit circle", "answer": "pi"}, "3.14159"),
         ({"prompt": "1/2?", "answer": "0.5"}, "1/2"), ({"prompt": "x", "answer": "y"}, "z")]
TEMPLATE = "Q: {question}\nRef: {reference}\nA: {response}\nVerdict:"
NEW_TOKENS = 6


def _save_judge_checkpoint(rank, world_size, path):
    from megatron_k15.checkpointing import save_checkpoint
    from megatron_k15.initialize import initialize_model_parallel
    from megatron_k15.models.config import preset
    from megatron_k15.training import build_train_context

    initialize_model_parallel(1)
    args = argparse.Namespace(lr=1e-3, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8,
                              clip_grad=1.0, attention_backend="sdpa", params_dtype=torch.float32,
                              sequence_parallel=True, recompute_granularity=None, grad_bucket_numel=10_000)
    ctx = build_train_context(args, preset("tiny", num_layers=2, init_method_std=0.3), seed=5)
    save_checkpoint(path, None, ctx)


def _judge_args(path, prompt_file, tp=1):
    return SimpleNamespace(reward_model_load=path, reward_model_tokenizer="byte", reward_model_prompt=prompt_file,
                           reward_model_chat_template=False, reward_model_mode="replace",
                           reward_model_tasks="math", reward_model_max_tokens=NEW_TOKENS,
                           pipeline_model_parallel_size=1, context_parallel_size=1, tensor_model_parallel_size=tp,
                           attention_backend="sdpa", params_dtype=torch.float32, rollout_batch_size=3)


def _judge_worker(rank, world_size, path, prompt_file, tp):
    import torch.distributed as dist

    from megatron_k15.initialize import initialize_model_parallel
    from megatron_k15.rewards.judge import judge_from_args

    initialize_model_parallel(tp)
    dp = world_size // tp
    group = dist.new_group(list(range(world_size))) if dp > 1 else None
    judge = judge_from_args(_judge_args(path, prompt_file, tp), rank=rank // tp, size=dp, group=group)
    return judge.judge(ITEMS)


def _recompute_worker(rank, world_size, path, prompt_file):
    """One rank: the judge's results, and the reference texts from a full-recompute generation
    of the same prompts by the same checkpoint."""
    from megatron_k15.checkpointing import load_config, load_model_checkpoint
    from megatron_k15.generation.recompute import generate_recompute
    from megatron_k15.generation.sampling import SamplingParams
    from megatron_k15.models.gpt import GPTModel

    judged = _judge_worker(rank, world_size, path, prompt_file, 1)
    cfg = load_config(path)
    model = GPTModel(cfg, attention_backend="sdpa", params_dtype=torch.float32)
    load_model_checkpoint(model, path)
    model.eval()
    tok = ByteTokenizer()
    prompts = [tok.encode(TEMPLATE.format(question=r["prompt"], reference=r["answer"], response=a))
               for r, a in ITEMS]
    res = generate_recompute(model, prompts, NEW_TOKENS, SamplingParams(temperature=0.0),
                             [None] * len(prompts), cfg.eos_ids())
    return judged, [tok.decode([t for t in r.output_ids if t < 256]) for r in res]


@pytest.fixture(scope="module")
def judge_checkpoint(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("judge") / "ckpt")
    run_distributed(_save_judge_checkpoint, 1, path)
    return path


def _split_worker(rank, world_size, sizes):
    """Two ranks share the judging (rank 1 has nothing to judge when there is one item), and
    their rule-based rewards disagree (a verifier that timed out on rank 1): rank 0's count."""
    import torch.distributed as dist

    tok = ByteTokenizer()
    out = []
    for n_items in sizes:
        gen = _ScriptedGenerator(tok, accepted={"r0"})
        judge = GenerativeJudge(gen, tok.encode, tok.decode, [], max_new_tokens=8, rank=rank,
                                size=world_size, group=dist.group.WORLD)
        graded = [f"r{i}" for i in range(n_items)]
        rule = [0.0] * n_items if rank == 0 else [1.0] * n_items
        new, judgements = judge.regrade([MATH] * n_items, graded, rule)
        out.append((new, [(j.index, j.verdict) for j in judgements], len(gen.prompts)))
    return out


@pytest.mark.slow
def test_ranks_agree_on_what_to_judge_and_split_it():
    cases = ((1, [1, 0]), (3, [2, 1]))
    per_rank = run_distributed(_split_worker, 2, [n for n, _ in cases])
    for (n_items, mine), results in zip(cases, zip(*per_rank)):
        for rank, (new, judged, asked) in enumerate(results):
            assert new == [1.0] + [0.0] * (n_items - 1)
            assert judged == [(0, True)] + [(i, False) for i in range(1, n_items)]
            assert asked == mine[rank]


@pytest.mark.slow
def test_judge_generates_like_a_full_recompute_in_every_layout(judge_checkpoint, tmp_path):
    path = judge_checkpoint
    prompt_file = tmp_path / "judge.txt"
    prompt_file.write_text(TEMPLATE)
    one_rank, want = run_distributed(_recompute_worker, 1, path, str(prompt_file))[0]
    assert any(want)
    # one rank; tp=2; two replicas splitting the items
    for world, tp, results in ((1, 1, [one_rank]), (2, 2, None), (2, 1, None)):
        for got in results or run_distributed(_judge_worker, world, path, str(prompt_file), tp):
            assert [text for _, text, _ in got] == want, (world, tp)
            # NEW_TOKENS is the whole budget: every text is cut off, so none has a verdict
            assert [(v, cut) for v, _, cut in got] == [(None, True)] * len(want)


@pytest.mark.slow
def test_train_rl_with_a_judge(judge_checkpoint, tmp_path):
    """train_rl --reward-model-load: the judge grades every rollout (replace mode) and its
    counts reach metrics.jsonl."""
    path = judge_checkpoint
    src = tmp_path / "p.jsonl"
    src.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"{i}+1=", "task": "math", "answer": str(i + 1)})
                           + "\n" for i in range(2)))
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"), "--mode", "prompts",
                    "--input", str(src), "--output-prefix", str(tmp_path / "p"), "--tokenizer", "byte",
                    "--no-progress"], check=True, capture_output=True)
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run(
        [sys.executable, "-m", "megatron_k15.train_rl", "--load", path, "--finetune", "--tokenizer", "byte",
         "--prompt-data", str(tmp_path / "p"), "--attention-backend", "sdpa", "--samples-per-prompt", "2",
         "--prompts-per-iter", "2", "--rollout-max-tokens", "4", "--micro-batch-size", "2", "--lr", "1e-3",
         "--train-iters", "1", "--log-interval", "1", "--tensorboard-dir", str(tmp_path / "tb"),
         "--reward-model-load", path, "--reward-model-tokenizer", "byte", "--reward-model-mode", "replace",
         "--reward-model-max-tokens", "3"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    (m,) = [json.loads(line) for line in (tmp_path / "tb" / "metrics.jsonl").read_text().splitlines()]
    assert m["judge_calls"] == m["num_finished"] == 4
    # 3 greedy bytes of a random model hold no verdict: each counts as unparsed and wrong
    assert m["judge_unparsed_fraction"] == 1.0 and m["accuracy"] == 0.0
    assert m["rule_accuracy"] == 0.0  # no 3-token response answers "i+1" here either

    # tools/evaluate.py with the same judge: every sample judged, the counts in the summary
    res = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "evaluate.py"), "--load", path, "--tokenizer", "byte",
         "--input", str(src), "--output", str(tmp_path / "eval.jsonl"), "--max-new-tokens", "3",
         "--attention-backend", "sdpa", "--reward-model-load", path, "--reward-model-tokenizer", "byte",
         "--reward-model-mode", "replace", "--reward-model-max-tokens", "3"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    summary = json.loads((tmp_path / "eval.summary.json").read_text())
    assert summary["judge_calls"] == 2 and summary["judge_unparsed_fraction"] == 1.0
    assert summary["judge_truncated_fraction"] == 1.0 and "rule_accuracy" in summary
    rows = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert all(s["judge_verdict"] is None and len(s["judge_text"]) <= 3 for r in rows for s in r["samples"])
