"""The generate CLI: greedy ids equal transformers' generate, log-probs are the model's, tp=2
equals tp=1, and bad input fails with file:line."""

import json
import os
import subprocess
import sys

import pytest
import torch

from megatron_k15 import generate
from megatron_k15.testing import save_tiny_hf_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONVERT = os.path.join(ROOT, "tools", "checkpoint", "convert_hf_to_megatron.py")
PROMPTS = [[5, 6, 7], [10, 11, 12, 13, 14, 15, 16, 17, 18], [42], [7, 7, 7, 7, 9]]
NEW_TOKENS = 12


def _convert(hf_dir, out, tp=1):
    subprocess.run([sys.executable, CONVERT, "--hf-dir", str(hf_dir), "--save", str(out),
                    "--tensor-model-parallel-size", str(tp)], check=True, capture_output=True)


def _write_prompts(path, prompts):
    with open(path, "w") as f:
        for i, p in enumerate(prompts):
            f.write(json.dumps({"prompt_ids": p, "id": f"p{i}"}) + "\n")


def _read(path):
    return [json.loads(line) for line in open(path)]


def _torchrun_generate(argv):
    """The generate CLI on two ranks (torchrun); the finished process."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m",
                           "megatron_k15.generate"] + argv, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def converted(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    # a larger init makes the random model's distribution peaked, so greedy has clear winners
    hf = save_tiny_hf_checkpoint(str(tmp / "hf"), request.param, initializer_range=0.2)
    _convert(tmp / "hf", tmp / "ck1")
    return hf, tmp


@pytest.mark.parametrize("load", ["ck1", "hf"])  # our checkpoint, or the HF directory as it is
def test_greedy_matches_transformers_generate(converted, load):
    hf, tmp = converted
    _write_prompts(tmp / "in.jsonl", PROMPTS)
    assert generate.main(["--load", str(tmp / load), "--input", str(tmp / "in.jsonl"),
                          "--output", str(tmp / "out.jsonl"), "--max-new-tokens", str(NEW_TOKENS),
                          "--temperature", "0", "--batch-size", "3"]) == 0
    out = _read(tmp / "out.jsonl")
    assert [o["id"] for o in out] == [f"p{i}" for i in range(len(PROMPTS))]  # keys carried through
    eos = hf.generation_config.eos_token_id
    for prompt, rec in zip(PROMPTS, out):
        ref = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=NEW_TOKENS,
                          pad_token_id=0)[0, len(prompt):].tolist()
        assert rec["output_ids"] == ref
        assert rec["stop_reason"] == ("eos" if ref[-1] == eos and len(ref) <= NEW_TOKENS and eos in ref else "length")
        # log-probs are the model's own (full recompute of prompt + output with transformers)
        seq = torch.tensor([prompt + rec["output_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(hf(seq).logits.float(), -1)[0]
        expect = [logp[len(prompt) - 1 + t, tok].item() for t, tok in enumerate(rec["output_ids"])]
        assert max(abs(a - b) for a, b in zip(rec["output_logprobs"], expect)) <= 1e-4


def test_sampling_is_seeded_per_request(converted):
    _, tmp = converted
    _write_prompts(tmp / "a.jsonl", PROMPTS)
    _write_prompts(tmp / "b.jsonl", PROMPTS[:1])
    common = ["--load", str(tmp / "ck1"), "--max-new-tokens", "6", "--temperature", "1.0",
              "--top-p", "0.9", "--seed", "7"]
    assert generate.main(common + ["--input", str(tmp / "a.jsonl"), "--output", str(tmp / "a.out")]) == 0
    assert generate.main(common + ["--input", str(tmp / "b.jsonl"), "--output", str(tmp / "b.out"),
                                   "--batch-size", "1"]) == 0
    a, b = _read(tmp / "a.out"), _read(tmp / "b.out")
    assert a[0]["output_ids"] == b[0]["output_ids"]  # alone or in a batch: same tokens
    assert all(lp <= 0 for rec in a for lp in rec["output_logprobs"])


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp", "pp", "cp"])
def test_torchrun_two_ranks_equal_one_rank(converted, layout):
    """tp=2 (checkpoint converted at tp=2), pp=2 (the tp=1 checkpoint resharded on load) and
    cp=2 (KV cache sharded over cp) generate the same tokens and log-probs as one rank."""
    _, tmp = converted
    if tmp.name.startswith("llama"):
        pytest.skip("one architecture is enough for the torchrun path (tp=2 model equality covers both)")
    flag = {"tp": "--tensor-model-parallel-size", "pp": "--pipeline-model-parallel-size",
            "cp": "--context-parallel-size"}[layout]
    load = tmp / "ck1"
    if layout == "tp":
        _convert(tmp / "hf", tmp / "ck2", tp=2)
        load = tmp / "ck2"
    _write_prompts(tmp / "in2.jsonl", PROMPTS)
    args = ["--input", str(tmp / "in2.jsonl"), "--max-new-tokens", "8", "--temperature", "0.8", "--seed", "3"]
    out = tmp / f"{layout}2.jsonl"
    proc = _torchrun_generate(["--load", str(load), flag, "2", "--output", str(out)] + args)
    assert "tokens/s" in proc.stderr
    if not os.path.exists(tmp / "tp1.jsonl"):
        assert generate.main(["--load", str(tmp / "ck1"), "--output", str(tmp / "tp1.jsonl")] + args) == 0
    one, two = _read(tmp / "tp1.jsonl"), _read(out)
    for x, y in zip(one, two):
        assert x["output_ids"] == y["output_ids"]
        assert max(abs(a - b) for a, b in zip(x["output_logprobs"], y["output_logprobs"])) <= 1e-5


@pytest.mark.slow
def test_torchrun_cp2_sliding_window_and_sinks_split_requests(tmp_path):
    """gpt-oss (a sliding layer of window 8, attention sinks) cannot decode with the KV cache
    sharded over cp, so at --context-parallel-size 2 the two cp ranks take different requests
    (like data-parallel replicas), each with a whole cache: the same tokens and log-probs as
    one rank, each request generated once (tokens counted once)."""
    save_tiny_hf_checkpoint(str(tmp_path / "hf"), "gpt_oss", initializer_range=0.2, sliding_window=8)
    _convert(tmp_path / "hf", tmp_path / "ck")
    prompts = PROMPTS + [list(range(3, 30))]  # longer than the window
    _write_prompts(tmp_path / "in.jsonl", prompts)
    args = ["--load", str(tmp_path / "ck"), "--input", str(tmp_path / "in.jsonl"), "--max-new-tokens", "10",
            "--temperature", "0.8", "--seed", "3"]
    proc = _torchrun_generate(["--context-parallel-size", "2", "--output", str(tmp_path / "cp2.jsonl")] + args)
    assert generate.main(args + ["--output", str(tmp_path / "one.jsonl")]) == 0
    one, two = _read(tmp_path / "one.jsonl"), _read(tmp_path / "cp2.jsonl")
    assert len(one) == len(two) == len(prompts)
    for x, y in zip(one, two):
        assert x["output_ids"] == y["output_ids"]
        assert max(abs(a - b) for a, b in zip(x["output_logprobs"], y["output_logprobs"])) <= 1e-5
    total = sum(len(x["output_ids"]) for x in one)
    assert f"{total} tokens in" in proc.stderr  # each request counted once, not once per cp rank


def test_text_prompts_with_tokenizer(converted):
    _, tmp = converted
    with open(tmp / "t.jsonl", "w") as f:
        f.write(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n")
    assert generate.main(["--load", str(tmp / "ck1"), "--input", str(tmp / "t.jsonl"), "--output",
                          str(tmp / "t.out"), "--tokenizer", "byte", "--max-new-tokens", "4",
                          "--temperature", "0"]) == 0
    rec = _read(tmp / "t.out")[0]
    assert rec["answer"] == "2" and isinstance(rec["text"], str) and len(rec["output_ids"]) <= 4


def test_chat_template_renders_text_prompts(converted, capsys):
    """--chat-template: a text prompt becomes a user turn + generation prompt (the built-in
    simple template of the byte tokenizer, written out here by hand)."""
    _, tmp = converted
    (tmp / "c.jsonl").write_text(json.dumps({"prompt": "1+1="}) + "\n")
    _write_prompts(tmp / "c_ids.jsonl", [list("<|user|>\n1+1=\n<|assistant|>\n".encode())])
    common = ["--load", str(tmp / "ck1"), "--tokenizer", "byte", "--max-new-tokens", "4", "--temperature", "0"]
    assert generate.main(common + ["--input", str(tmp / "c.jsonl"), "--output", str(tmp / "c.out"),
                                   "--chat-template"]) == 0
    assert generate.main(common + ["--input", str(tmp / "c_ids.jsonl"), "--output", str(tmp / "c_ids.out")]) == 0
    assert _read(tmp / "c.out")[0]["output_ids"] == _read(tmp / "c_ids.out")[0]["output_ids"]
    assert generate.main(common + ["--input", str(tmp / "c.jsonl"), "--output", str(tmp / "x.out"),
                                   "--chat-template-kwargs", "{}"]) == 2
    assert "--chat-template-kwargs applies to --chat-template only" in capsys.readouterr().err


@pytest.mark.parametrize("line,expected", [
    ("{not json", "in.jsonl:2"),
    ('{"prompt_ids": "abc"}', "prompt_ids"),
    ('{"prompt_ids": [1, 100000]}', "100000"),
    ('{"text": "no prompt"}', "prompt"),
])
def test_malformed_input_line(converted, capsys, line, expected):
    _, tmp = converted
    with open(tmp / "in.jsonl", "w") as f:
        f.write(json.dumps({"prompt_ids": [1, 2]}) + "\n" + line + "\n")
    code = generate.main(["--load", str(tmp / "ck1"), "--input", str(tmp / "in.jsonl"),
                          "--output", str(tmp / "bad.out"), "--max-new-tokens", "2"])
    err = capsys.readouterr().err
    assert code != 0 and expected in err and "in.jsonl:2" in err
    assert not os.path.exists(tmp / "bad.out")


def test_bad_flags_exit_with_message(converted, capsys):
    _, tmp = converted
    with pytest.raises(SystemExit) as e:
        generate.main(["--load", str(tmp / "ck1"), "--input", str(tmp / "in.jsonl"), "--output",
                       str(tmp / "x"), "--top-p", "1.5"])
    assert e.value.code != 0 and "--top-p" in capsys.readouterr().err


@pytest.mark.slow
def test_torchrun_expert_parallel_equals_one_rank(tmp_path):
    """A Qwen3-MoE checkpoint generated by two data-parallel ranks that split its experts
    (--expert-model-parallel-size 2; 5 requests: one rank has more, the other serves it once
    done) equals one rank holding all experts."""
    save_tiny_hf_checkpoint(str(tmp_path / "hf"), "qwen3_moe", initializer_range=0.2)
    _convert(tmp_path / "hf", tmp_path / "ck")
    _write_prompts(tmp_path / "in.jsonl", PROMPTS + [[3, 1, 4, 1, 5, 9, 2, 6]])
    args = ["--load", str(tmp_path / "ck"), "--input", str(tmp_path / "in.jsonl"), "--max-new-tokens", "8",
            "--temperature", "0.8", "--seed", "3"]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "megatron_k15.generate",
         "--expert-model-parallel-size", "2", "--output", str(tmp_path / "ep2.jsonl")] + args,
        capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert generate.main(args + ["--output", str(tmp_path / "ep1.jsonl")]) == 0
    one, two = _read(tmp_path / "ep1.jsonl"), _read(tmp_path / "ep2.jsonl")
    assert [x["id"] for x in one] == [x["id"] for x in two] and len(one) == 5
    for x, y in zip(one, two):
        assert x["output_ids"] == y["output_ids"]
        assert max(abs(a - b) for a, b in zip(x["output_logprobs"], y["output_logprobs"])) <= 1e-5


def test_an_interrupted_run_resumes_to_the_same_output(tmp_path, capsys):
    """Cut after 2 of 5 requests (OUTPUT.partial: two whole lines and one cut short), a run
    with --resume in chunks of 2 writes the output of one pass (each request is seeded by its
    line): the same tokens, log-probs to fp32 rounding (other batch shapes); without --resume it
    refuses to overwrite; a changed input is refused."""
    hf = save_tiny_hf_checkpoint(str(tmp_path / "hf"), "qwen2", initializer_range=0.2)
    del hf
    _convert(tmp_path / "hf", tmp_path / "ck")
    prompts = PROMPTS + [[3, 1, 4, 1, 5]]
    _write_prompts(tmp_path / "in.jsonl", prompts)

    def run(out, *extra):
        return generate.main(["--load", str(tmp_path / "ck"), "--input", str(tmp_path / "in.jsonl"),
                              "--output", str(tmp_path / out), "--max-new-tokens", "6", "--temperature", "1.0",
                              "--seed", "5", *extra])

    assert run("whole.jsonl") == 0
    lines = open(tmp_path / "whole.jsonl").read().splitlines()
    kept = [json.dumps({"index": i, "output": json.loads(lines[i])}) + "\n" for i in (0, 1, 2)]
    (tmp_path / "resumed.jsonl.partial").write_text(kept[0] + kept[1] + kept[2][:30])
    with pytest.raises(SystemExit):
        run("resumed.jsonl")
    assert "pass --resume" in capsys.readouterr().err
    assert run("resumed.jsonl", "--resume", "--chunk-size", "2") == 0
    assert "resuming: 2 of 5 requests done" in capsys.readouterr().err
    whole, resumed = _read(tmp_path / "whole.jsonl"), _read(tmp_path / "resumed.jsonl")
    assert resumed[:2] == whole[:2]  # kept as they were
    for a, b in zip(resumed, whole):
        assert {k: v for k, v in a.items() if k != "output_logprobs"} == \
            {k: v for k, v in b.items() if k != "output_logprobs"}
        assert a["output_logprobs"] == pytest.approx(b["output_logprobs"], abs=1e-5)
    assert not (tmp_path / "resumed.jsonl.partial").exists()
    (tmp_path / "other.jsonl.partial").write_text(kept[1].replace('"p1"', '"q1"'))
    assert run("other.jsonl", "--resume") == 2
    assert "other.jsonl.partial:1: field 'id': differs from line 2 of --input" in capsys.readouterr().err


def test_longrope_factors_by_the_longest_request(tmp_path):
    """A LongRoPE model (pretrained context 32) generating prompts of <= 9 tokens + 12: the
    longest request fits the original context, so the run takes the short factors (as
    transformers does for sequences that short): its log-probs are those of --longrope-factors
    short, and differ from --longrope-factors long's."""
    from test_model_hf import LONGROPE

    save_tiny_hf_checkpoint(str(tmp_path / "hf"), "phi3", initializer_range=0.2, **LONGROPE)
    _write_prompts(tmp_path / "in.jsonl", PROMPTS)
    out = {}
    for factors in ("auto", "short", "long"):
        assert generate.main(["--load", str(tmp_path / "hf"), "--input", str(tmp_path / "in.jsonl"),
                              "--output", str(tmp_path / f"{factors}.jsonl"), "--max-new-tokens", str(NEW_TOKENS),
                              "--temperature", "0", "--longrope-factors", factors]) == 0
        out[factors] = [lp for rec in _read(tmp_path / f"{factors}.jsonl") for lp in rec["output_logprobs"]]
    assert out["auto"] == out["short"]
    assert max(abs(a - b) for a, b in zip(out["auto"], out["long"])) > 1e-4
