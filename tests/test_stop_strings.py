"""Stop strings (generation/stop_strings.py): a request ends at the token that completes the
first occurrence of a string in its text, whatever the tokens that spell it; both engines; the
generate CLI's text ends before it."""

import json
import os
import subprocess
import sys

import pytest

from megatron_k15.data.tokenizer import ByteTokenizer
from megatron_k15.generation.engine import GenerationEngine
from megatron_k15.generation.recompute import generate_recompute
from megatron_k15.generation.sampling import SamplingParams, request_generator
from megatron_k15.generation.stop_strings import StopStrings, cut_at_stop
from megatron_k15.initialize import initialize_model_parallel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _first_stop(ids, stop: str, tok) -> int:
    """How many of ``ids`` it takes for their text to contain ``stop`` (by decoding every
    prefix: the reference for the matcher's window); None if they never do."""
    for k in range(1, len(ids) + 1):
        if stop in tok.decode([t for t in ids[:k] if t < tok.vocab_size]):
            return k
    return None


def _ascii_pair(text: str):
    """The first two printable ASCII characters in a row in ``text`` (None if there are none)."""
    return next((text[i:i + 2] for i in range(len(text) - 1)
                 if text[i:i + 2].isascii() and text[i:i + 2].isprintable()), None)


def _push_all(spec, text: str, tok) -> int:
    """How many tokens of ``text`` a matcher takes before it says stop (len if never)."""
    m = spec()
    for k, t in enumerate(tok.encode(text), start=1):
        if m.push(t):
            return k
    return len(tok.encode(text))


def test_matcher_stops_at_the_completing_token():
    tok = ByteTokenizer()
    spec = StopStrings(tok, ["</answer>", "\n\nQ:"])
    text = "x = 3 </answ <answer>42</answer> more"
    assert _push_all(spec, text, tok) == len(tok.encode(text[:text.index("</answer>") + 9]))
    assert _push_all(spec, "one\n\nQ: two", tok) == len(tok.encode("one\n\nQ:"))
    assert _push_all(spec, "no marker here", tok) == len(tok.encode("no marker here"))
    # multi-byte characters: byte tokens, the window covers the string's UTF-8 bytes
    accents = StopStrings(tok, ["é!"])
    assert _push_all(accents, "café au lait é!x", tok) == len("café au lait é!".encode("utf-8"))
    assert cut_at_stop("a</answer>b\n\nQ:", ["\n\nQ:", "</answer>"]) == "a"
    assert cut_at_stop("abc", ["z"]) == "abc" and cut_at_stop("abc", None) == "abc"
    with pytest.raises(ValueError):
        StopStrings(tok, [""])


@pytest.fixture
def model():  # per test: the CLI test's run ends by destroying the process groups
    from megatron_k15.models.config import preset
    from megatron_k15.models.gpt import GPTModel

    initialize_model_parallel(1)
    m = GPTModel(preset("tiny", init_method_std=0.3), attention_backend="sdpa")
    m.reset_parameters(5)
    return m.eval()


@pytest.mark.parametrize("engine", ["paged", "recompute"])
def test_engines_stop_where_the_string_first_appears(model, engine):
    """Sampled byte-level text: a stop string cut from one request's unstopped output ends
    that request at the token completing its first occurrence, with the same tokens before."""
    tok = ByteTokenizer()
    prompts = [tok.encode("abc"), tok.encode("hello"), tok.encode("12")]
    params = SamplingParams(temperature=1.0)

    def run(detector=None):
        gens = [request_generator(4, i) for i in range(len(prompts))]
        if engine == "paged":
            return GenerationEngine(model, block_size=4).generate(prompts, 24, params, gens, [257],
                                                                  repeat_detector=detector)
        return generate_recompute(model, prompts, 24, params, gens, [257], detector)

    free = run()
    stop = next(p for p in (_ascii_pair(tok.decode([t for t in r.output_ids if t < 260])) for r in free) if p)
    stopped = run(StopStrings(tok, [stop]))
    ends = [_first_stop(b.output_ids, stop, tok) for b in free]
    assert any(ends)
    for a, b, end in zip(stopped, free, ends):
        if end is not None:  # ends at the first occurrence, the tokens before unchanged
            assert a.stop_reason == "stop" and a.output_ids == b.output_ids[:end]
        else:
            assert a.output_ids == b.output_ids and a.stop_reason == b.stop_reason


def test_generate_cli_text_ends_before_the_stop_string(tmp_path):
    """``generate --stop S``: the request whose free-running text contains S ends at it, its
    ``text`` is what came before and its ids are the free run's up to the completing token."""
    from megatron_k15 import generate
    from megatron_k15.testing import save_tiny_hf_checkpoint

    save_tiny_hf_checkpoint(str(tmp_path / "hf"), "qwen2", initializer_range=0.05)
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "checkpoint", "convert_hf_to_megatron.py"),
                    "--hf-dir", str(tmp_path / "hf"), "--save", str(tmp_path / "ck")], check=True,
                   capture_output=True)
    with open(tmp_path / "in.jsonl", "w") as f:
        for i, p in enumerate(["The", "Once upon", "x ="]):
            f.write(json.dumps({"prompt": p, "id": f"p{i}"}) + "\n")

    def run(name, *extra):
        assert generate.main(["--load", str(tmp_path / "ck"), "--tokenizer", "byte", "--input",
                              str(tmp_path / "in.jsonl"), "--output", str(tmp_path / name), "--max-new-tokens",
                              "40", "--temperature", "1.0", "--seed", "3", *extra]) == 0
        return [json.loads(line) for line in open(tmp_path / name)]

    free = run("free.jsonl")
    stop = next(p for p in (_ascii_pair(r["text"]) for r in free) if p)  # from one request's text
    stopped = run("stopped.jsonl", "--stop", stop)
    tok = ByteTokenizer()
    assert any(stop in b["text"] for b in free)
    for a, b in zip(stopped, free):
        if stop in b["text"]:
            assert a["stop_reason"] == "stop" and a["text"] == b["text"][:b["text"].index(stop)]
            assert a["output_ids"] == b["output_ids"][:_first_stop(b["output_ids"], stop, tok)]
        else:  # (other batch shapes once a request stops: the log-probs agree to fp32 rounding)
            assert (a["output_ids"], a["text"], a["stop_reason"]) == (b["output_ids"], b["text"], b["stop_reason"])
            assert a["output_logprobs"] == pytest.approx(b["output_logprobs"], abs=1e-5)


def no_marker(response, record):
    """A reward plug-in: 1 when the graded text does not contain the record's marker."""
    return float(record["marker"] not in response)


def test_evaluation_grades_the_text_before_the_stop_string(model):
    from megatron_k15.rl.evaluation import evaluate

    tok = ByteTokenizer()
    recs = [{"id": f"r{i}", "prompt": p, "task": "t", "reward_fn": f"{__name__}:no_marker", "marker": ""}
            for i, p in enumerate(["abc", "hello", "12"])]
    ids = [tok.encode(r["prompt"]) for r in recs]
    kw = dict(max_new_tokens=24, eos_ids=[257], n_samples=2, temperature=1.0, seed=4)
    free = evaluate(model, tok, recs, ids, **kw)["results"]
    marker = next(p for p in (_ascii_pair(s["text"]) for r in free for s in r["samples"]) if p)
    for r in recs:
        r["marker"] = marker
    unstopped = evaluate(model, tok, recs, ids, **kw)
    stopped = evaluate(model, tok, recs, ids, stop_strings=[marker], **kw)
    assert unstopped["accuracy"] < 1.0 and stopped["accuracy"] == 1.0
    hit = [s for r in stopped["results"] for s in r["samples"] if s["stop_reason"] == "stop"]
    assert hit and all(marker not in s["text"] for s in hit)


def test_partial_rollouts_see_a_stop_string_across_segments(model):
    """Greedy rollouts in segments of 2 tokens over several iterations stop where one
    uninterrupted rollout stops, also when the stop string spans a segment boundary: resumed
    trajectories' detectors are fed their earlier segments (rl.trainer._primed_detectors)."""
    from megatron_k15.generation.replay_buffer import Trajectory
    from megatron_k15.rl.trainer import RolloutSettings, rollout

    tok = ByteTokenizer()
    engine = GenerationEngine(model, block_size=4)
    prompts = ["abc", "hello", "12", "xyz", "The", "Once", "def f", "Q:"]

    def trajectories():
        return [Trajectory(prompt_id=f"p{i}", prompt_ids=tok.encode(p), group_id=f"g{i}")
                for i, p in enumerate(prompts)]

    def run(segment, stop=None):
        s = RolloutSettings(max_tokens=12, segment_tokens=segment, temperature=0.0, repeat_detection=True,
                            stop=StopStrings(tok, [stop]) if stop else None)
        trajs = trajectories()
        for it in range(12):
            live = [t for t in trajs if not t.finished]
            if not live:
                break
            rollout(engine, live, it, s, [257])
        return trajs

    free = run(0)
    # a stop string of two printable characters that segments of 2 split: tokens j, j + 1, j odd
    stop = next(tok.decode(t.response_ids[j:j + 2]) for t in free for j in range(1, len(t.response_ids) - 1, 2)
                if all(32 <= c < 127 for c in t.response_ids[j:j + 2]))
    whole, parts = run(0, stop), run(2, stop)
    assert any(t.stop_reason == "stop" for t in whole)
    for a, b in zip(parts, whole):
        assert (a.response_ids, a.stop_reason) == (b.response_ids, b.stop_reason)
