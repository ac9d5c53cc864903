"""tools/preprocess_data.py end to end, the JSONL readers, and the indexed-dataset format."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_k15.data.indexed import (
    IndexedDatasetWriter,
    IndexedTokens,
    dataset_files,
    load_prompt_dataset,
    load_sft_dataset,
)
from megatron_k15.data.prompts import (
    DataError,
    read_jsonl,
    read_prompt_records,
    validate_generation_record,
)
from megatron_k15.data.tokenizer import ByteTokenizer, load_tokenizer

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "preprocess_data.py"


def _load_tool():
    spec = importlib.util.spec_from_file_location("preprocess_data_tool", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


tool = _load_tool()


def run_tool(*args):
    """The CLI in a subprocess."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True,
                          text=True, cwd=str(REPO), env=env, timeout=120)


def run_inproc(capsys, *args):
    """The CLI's main() in this process (faster); returns (rc, stderr)."""
    rc = tool.main([str(a) for a in args])
    return rc, capsys.readouterr().err


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(r if isinstance(r, str) else json.dumps(r, ensure_ascii=False))
            f.write("\n")
    return path


def existing_outputs(prefix):
    d = Path(prefix).parent
    if not d.exists():
        return []
    return sorted(p.name for p in d.iterdir() if p.name.startswith(Path(prefix).name))


SFT_ROWS = [
    {"prompt": "What is 2+2? ", "response": "4, héllo ✓"},
    {"messages": [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"},
                  {"role": "assistant", "content": "hello 🙂"}, {"role": "user", "content": "bye"},
                  {"role": "assistant", "content": "ciao"}]},
    {"prompt": "数学", "response": "答案"},
]

PROMPT_ROWS = [
    {"id": "m1", "prompt": "1+1=?", "task": "math", "answer": "2", "difficulty": 1},
    {"id": "c1", "prompt": "echo the input", "task": "code",
     "tests": [{"input": "a\n", "output": "a\n"}], "difficulty": 2.5},
    {"prompt": "héllo, what is 3*3?", "answer": 9},  # id, task and difficulty defaulted
]


def expected_sft(tok, row, append_eos):
    """Direct tokenization of one SFT row, per the documented rules (simple template)."""
    if "prompt" in row:
        ids = tok.encode(row["prompt"]) + tok.encode(row["response"])
        mask = [0] * len(tok.encode(row["prompt"])) + [1] * len(tok.encode(row["response"]))
    else:
        ids, mask = [], []
        for m in row["messages"]:
            if m["role"] == "assistant":
                head, body = tok.encode("<|assistant|>\n"), tok.encode(m["content"] + "\n")
                ids += head + body
                mask += [0] * len(head) + [1] * len(body)
            else:
                t = tok.encode(f"<|{m['role']}|>\n{m['content']}\n")
                ids += t
                mask += [0] * len(t)
    if append_eos:
        ids, mask = ids + [tok.eos_id], mask + [1]
    return ids, mask


def test_sft_end_to_end(tmp_path):
    inp = write_jsonl(tmp_path / "sft.jsonl", SFT_ROWS[:2] + [""] + SFT_ROWS[2:])  # a blank line
    prefix = tmp_path / "out" / "sft"
    res = run_tool("--mode", "sft", "--input", inp, "--output-prefix", prefix,
                   "--tokenizer", "byte", "--append-eos")
    assert res.returncode == 0, res.stderr
    assert existing_outputs(prefix) == sorted(Path(f).name for f in dataset_files(str(prefix), "sft"))
    ds = load_sft_dataset(str(prefix))
    tok = ByteTokenizer()
    assert len(ds) == len(SFT_ROWS)
    for row, sample in zip(SFT_ROWS, ds):
        ids, mask = expected_sft(tok, row, append_eos=True)
        assert sample.tokens.tolist() == ids
        assert sample.loss_mask.tolist() == mask
    # round trip text -> ids -> text
    assert tok.decode(ds[0].tokens) == "What is 2+2? 4, héllo ✓"
    assert tok.decode(ds[0].tokens[ds[0].loss_mask == 1]) == "4, héllo ✓"
    assert tok.decode(ds[1].tokens[ds[1].loss_mask == 1]) == "hello 🙂\nciao\n"
    summary = json.loads((tmp_path / "out" / "sft.json").read_text())
    assert summary["mode"] == "sft" and summary["num_samples"] == 3
    assert summary["skipped_bad_lines"] == 0 and summary["tokenizer"] == "byte"
    assert summary["num_tokens"] == int(ds.lengths.sum())
    assert summary["num_loss_tokens"] == sum(int(s.loss_mask.sum()) for s in ds)


def test_prompts_end_to_end(tmp_path):
    inp = write_jsonl(tmp_path / "p.jsonl", PROMPT_ROWS)
    prefix = tmp_path / "pr"
    res = run_tool("--mode", "prompts", "--input", inp, "--output-prefix", prefix,
                   "--tokenizer", "byte", "--chat-template", "--no-progress")
    assert res.returncode == 0, res.stderr
    ds = load_prompt_dataset(str(prefix))
    tok = load_tokenizer("byte")
    assert len(ds) == 3
    for row, sample in zip(PROMPT_ROWS, ds):
        text = tok.apply_chat_template([{"role": "user", "content": row["prompt"]}])
        assert sample.prompt_ids.tolist() == tok.encode(text)
        assert tok.decode(sample.prompt_ids) == text
        assert sample.record["prompt"] == row["prompt"]
    recs = ds.records
    assert [r["id"] for r in recs] == ["m1", "c1", "p.jsonl:3"]
    assert [r["task"] for r in recs] == ["math", "code", "math"]
    assert recs[0]["answer"] == "2" and recs[2]["answer"] == "9"
    assert recs[1]["tests"] == [{"input": "a\n", "output": "a\n"}]
    assert [r["difficulty"] for r in recs] == [1.0, 2.5, 0.0]
    summary = json.loads((tmp_path / "pr.json").read_text())
    assert summary["mode"] == "prompts" and summary["num_samples"] == 3 and summary["chat_template"]


def test_workers_give_identical_output(tmp_path):
    rows = []
    for i in range(700):  # several chunks of lines
        if i % 3 == 0:
            rows.append({"prompt": f"q{i} ✓", "response": f"answer {i * 7}"})
        else:
            rows.append({"messages": [{"role": "user", "content": f"u{i}"},
                                      {"role": "assistant", "content": "é" * (i % 11)}]})
    rows[401] = '{"prompt": "broken"'  # a bad line, skipped in both runs
    inp = write_jsonl(tmp_path / "big.jsonl", rows)
    outs = {}
    for w in (1, 2):
        prefix = tmp_path / f"w{w}" / "d"
        res = run_tool("--mode", "sft", "--input", inp, "--output-prefix", prefix, "--tokenizer",
                       "byte", "--workers", w, "--skip-bad-lines", "--append-eos")
        assert res.returncode == 0, res.stderr
        outs[w] = {Path(f).name: Path(f).read_bytes() for f in dataset_files(str(prefix), "sft")}
    assert outs[1] == outs[2]
    summary = json.loads(outs[2]["d.json"])
    assert summary["num_samples"] == 699 and summary["skipped_bad_lines"] == 1
    assert any("big.jsonl:402" in b for b in summary["bad_lines"])


BAD_PROMPT_LINES = [
    ('{"id": "x", "prompt": "p", "answer": "1"', None, "invalid JSON"),
    ({"id": "x", "task": "math", "answer": "1"}, "prompt", "missing"),
    ({"id": "x", "prompt": 42, "answer": "1"}, "prompt", "expected a string"),
    ({"id": "x", "prompt": "p", "task": "math"}, "answer", "required for task 'math'"),
    ({"id": "x", "prompt": "p", "task": "code", "tests": [{"input": "1"}]}, "tests[0].output", "missing"),
    ({"id": "x", "prompt": "p", "task": "code", "tests": "assert f()"}, "tests", "expected a list"),
    ({"id": "x", "prompt": "p", "answer": "1", "difficulty": "hard"}, "difficulty", "expected a number"),
    ({"id": "x", "prompt": "p", "task": "code", "fn_name": "two sum", "tests": [{"input": [1], "output": 1}]},
     "fn_name", "expected a Python function name"),
    ({"id": "x", "prompt": "p", "task": "code", "fn_name": "f", "tests": [{"input": "1", "output": "1"}]},
     "tests[0].input", "expected a list of the function's arguments"),
    ({"id": "x", "prompt": "p", "task": "code", "tests": [{"input": "1", "output": "1"}], "checker": "def check(a, b):"},
     "checker", "does not parse"),
    ({"id": "x", "prompt": "p", "task": "code", "tests": [{"input": "1", "output": "1"}], "checker": "x = 1"},
     "checker", "defines no top-level function check"),
    ({"id": "x", "prompt": "p", "task": "code", "tests": [{"input": "1", "output": "1"}],
      "checker": "def check(i, o, e): return True", "compare": "tokens"}, "checker", "replaces compare"),
    ({"id": "a", "prompt": "p", "answer": "1"}, "id", "duplicate id 'a' (first on line 1)"),
    ('[1, 2]', None, "expected a JSON object"),
]


@pytest.mark.parametrize("bad,field,msg", BAD_PROMPT_LINES)
def test_bad_prompt_line_stops_with_location(tmp_path, capsys, bad, field, msg):
    good = [{"id": "a", "prompt": "p", "answer": "1"}, {"id": "b", "prompt": "q", "answer": "2"}]
    inp = write_jsonl(tmp_path / "in.jsonl", good + [bad] + [{"id": "c", "prompt": "r", "answer": "3"}])
    prefix = tmp_path / "out" / "pr"
    rc, err = run_inproc(capsys, "--mode", "prompts", "--input", inp, "--output-prefix", prefix,
                         "--tokenizer", "byte")
    assert rc != 0
    assert f"{inp}:3:" in err
    if field is not None:
        assert f"field '{field}'" in err
    assert msg in err
    assert existing_outputs(prefix) == []
    assert not (tmp_path / "out").exists()  # the directory it created is gone too


BAD_SFT_LINES = [
    ({"prompt": "p"}, "response", "missing"),
    ({"prompt": "p", "response": ["r"]}, "response", "expected a string"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "messages", "no assistant message"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role", "is not one of"),
    ({"messages": "hi"}, "messages", "expected a list"),
    ({"text": "hi"}, "prompt", "missing"),
    ({"conversations": [{"from": "robot", "value": "x"}]}, "conversations[0].from", "is not one of"),
    ({"conversations": "hi"}, "conversations", "expected a list"),
    ({"conversations": [{"from": "human", "value": "hi"}]}, "conversations", "no gpt/assistant turn"),
    ({"conversations": [{"from": "gpt"}]}, "conversations[0].value", "missing"),
    ({"instruction": "i"}, "output", "missing"),
    ({"instruction": "i", "input": 3, "output": "o"}, "input", "expected a string"),
]


def test_sharegpt_and_alpaca_lines_read_as_their_canonical_forms(tmp_path):
    """ShareGPT conversations (with a top-level system prompt) and Alpaca records (with and
    without input) give the same samples as the same data in our own fields."""
    theirs = [{"system": "Be brief.", "conversations": [{"from": "human", "value": "2+2?"},
                                                        {"from": "gpt", "value": "4"},
                                                        {"from": "human", "value": "and 3+3?"},
                                                        {"from": "gpt", "value": "6"}]},
              {"instruction": "Translate to French.", "input": "cat", "output": "chat"},
              {"instruction": "Say hi.", "input": "", "output": "hi"}]
    ours = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                          {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"},
                          {"role": "assistant", "content": "6"}]},
            {"prompt": "Translate to French.\n\ncat", "response": "chat"},
            {"prompt": "Say hi.", "response": "hi"}]
    samples = {}
    for name, rows in (("theirs", theirs), ("ours", ours)):
        res = run_tool("--mode", "sft", "--input", write_jsonl(tmp_path / f"{name}.jsonl", rows),
                       "--output-prefix", tmp_path / name, "--tokenizer", "byte", "--append-eos")
        assert res.returncode == 0, res.stderr
        samples[name] = [(s.tokens.tolist(), s.loss_mask.tolist()) for s in load_sft_dataset(str(tmp_path / name))]
    assert samples["theirs"] == samples["ours"] and len(samples["ours"]) == 3


@pytest.mark.parametrize("bad,field,msg", BAD_SFT_LINES)
def test_bad_sft_line_stops_with_location(tmp_path, capsys, bad, field, msg):
    inp = write_jsonl(tmp_path / "in.jsonl", [SFT_ROWS[0], "", bad])  # bad is on line 3
    prefix = tmp_path / "sft"
    rc, err = run_inproc(capsys, "--mode", "sft", "--input", inp, "--output-prefix", prefix,
                         "--tokenizer", "byte", "--workers", 1)
    assert rc != 0
    assert f"{inp}:3: field '{field}'" in err and msg in err
    assert existing_outputs(prefix) == []


def test_bad_line_subprocess_non_utf8_and_empty(tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(b'{"id": "a", "prompt": "p", "answer": "1"}\n{"id": "b", "prompt": "\xff\xfe"}\n')
    prefix = tmp_path / "pr"
    res = run_tool("--mode", "prompts", "--input", inp, "--output-prefix", prefix, "--tokenizer", "byte",
                   "--workers", 2)
    assert res.returncode != 0
    assert f"{inp}:2:" in res.stderr and "UTF-8" in res.stderr
    assert existing_outputs(prefix) == []
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    res = run_tool("--mode", "sft", "--input", empty, "--output-prefix", prefix, "--tokenizer", "byte")
    assert res.returncode != 0 and f"{empty}:1:" in res.stderr and "empty" in res.stderr
    assert existing_outputs(prefix) == []


def test_skip_bad_lines_counts(tmp_path, capsys):
    rows = [PROMPT_ROWS[0], {"id": "z", "prompt": 1}, '{oops', PROMPT_ROWS[1], {"id": "m1", "prompt": "dup", "answer": "1"}]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    prefix = tmp_path / "pr"
    rc, err = run_inproc(capsys, "--mode", "prompts", "--input", inp, "--output-prefix", prefix,
                         "--tokenizer", "byte", "--skip-bad-lines")
    assert rc == 0, err
    assert "3 bad lines skipped" in err
    assert f"{inp}:2: field 'prompt'" in err and f"{inp}:3:" in err and f"{inp}:5: field 'id'" in err
    ds = load_prompt_dataset(str(prefix))
    assert [r["id"] for r in ds.records] == ["m1", "c1"]
    assert ds.summary["skipped_bad_lines"] == 3 and len(ds.summary["bad_lines"]) == 3
    # every line bad: nothing to write, non-zero exit
    inp2 = write_jsonl(tmp_path / "allbad.jsonl", ['{', '{"prompt": 3}'])
    rc, err = run_inproc(capsys, "--mode", "prompts", "--input", inp2, "--output-prefix",
                         tmp_path / "none", "--tokenizer", "byte", "--skip-bad-lines")
    assert rc != 0 and "no samples left" in err
    assert existing_outputs(tmp_path / "none") == []


def test_seq_length_drop_and_truncate(tmp_path, capsys):
    rows = [{"prompt": "ab", "response": "cd"}, {"prompt": "abcdefgh", "response": "ijklmnop"},
            {"prompt": "abcdefghijkl", "response": "mn"}]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    rc, err = run_inproc(capsys, "--mode", "sft", "--input", inp, "--output-prefix", tmp_path / "drop",
                         "--tokenizer", "byte", "--seq-length", 10)
    assert rc == 0, err
    ds = load_sft_dataset(str(tmp_path / "drop"))
    assert len(ds) == 1 and ds.summary["dropped_overlong"] == 2 and ds.summary["truncated"] == 0
    rc, err = run_inproc(capsys, "--mode", "sft", "--input", inp, "--output-prefix", tmp_path / "trunc",
                         "--tokenizer", "byte", "--seq-length", 10, "--overlong", "truncate")
    assert rc == 0, err
    ds = load_sft_dataset(str(tmp_path / "trunc"))
    # row 3 would keep no response token after truncation, so it is dropped
    assert len(ds) == 2 and ds.summary["truncated"] == 1 and ds.summary["dropped_overlong"] == 1
    assert ds[1].tokens.tolist() == list(b"abcdefghij") and ds[1].loss_mask.tolist() == [0] * 8 + [1] * 2


CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")
# Qwen3-like: thinking unless the caller passes enable_thinking=false
THINKING_TEMPLATE = CHAT_TEMPLATE.replace(
    "<assistant>{% endif %}",
    "<assistant>{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}"
    "{% endif %}")


def _hf_tokenizer(path, template):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(["hi there", "hello you"] * 3, trainers.BpeTrainer(
        vocab_size=280, special_tokens=["<unk>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="</s>", unk_token="<unk>")
    fast.chat_template = template
    fast.save_pretrained(str(path))


def test_chat_template_kwargs_reach_the_template(tmp_path, capsys):
    _hf_tokenizer(tmp_path / "tok", THINKING_TEMPLATE)
    inp = write_jsonl(tmp_path / "in.jsonl", PROMPT_ROWS)
    common = ("--mode", "prompts", "--input", inp, "--tokenizer", tmp_path / "tok", "--chat-template")
    rc, err = run_inproc(capsys, *common, "--output-prefix", tmp_path / "think")
    assert rc == 0, err
    rc, err = run_inproc(capsys, *common, "--output-prefix", tmp_path / "nothink",
                         "--chat-template-kwargs", '{"enable_thinking": false}')
    assert rc == 0, err
    tok = load_tokenizer(str(tmp_path / "tok"))
    think, nothink = load_prompt_dataset(str(tmp_path / "think")), load_prompt_dataset(str(tmp_path / "nothink"))
    for i, row in enumerate(PROMPT_ROWS):
        head = f"<user>{row['prompt']}</s><assistant>"
        assert think[i].prompt_ids.tolist() == tok.encode(head)
        assert nothink[i].prompt_ids.tolist() == tok.encode(head + "<think></think>")


def test_system_prompt_is_a_system_turn_before_each_prompt(tmp_path, capsys):
    """--system-prompt: the template renders a system turn first (a transformers template and
    the built-in one); evaluate / generate render the same ids (encode_prompt)."""
    import argparse

    from megatron_k15.data.tokenizer import encode_prompt

    _hf_tokenizer(tmp_path / "tok", CHAT_TEMPLATE)
    inp = write_jsonl(tmp_path / "in.jsonl", PROMPT_ROWS)
    system = "Please reason step by step, and put your final answer within \\boxed{}."
    for spec, head in ((str(tmp_path / "tok"), f"<system>{system}</s><user>PROMPT</s><assistant>"),
                       ("byte", f"<|system|>\n{system}\n<|user|>\nPROMPT\n<|assistant|>\n")):
        rc, err = run_inproc(capsys, "--mode", "prompts", "--input", inp, "--tokenizer", spec, "--chat-template",
                             "--system-prompt", system, "--output-prefix", tmp_path / "sys")
        assert rc == 0, err
        tok = load_tokenizer(spec)
        ds = load_prompt_dataset(str(tmp_path / "sys"))
        assert ds.summary["system_prompt"] == system
        args = argparse.Namespace(chat_template=True, chat_template_kwargs=None, system_prompt=system)
        for i, row in enumerate(PROMPT_ROWS):
            assert ds[i].prompt_ids.tolist() == tok.encode(head.replace("PROMPT", row["prompt"]))
            assert encode_prompt(tok, row["prompt"], args) == ds[i].prompt_ids.tolist()


def test_a_template_without_system_turns_is_named(tmp_path):
    import argparse

    from megatron_k15.data.tokenizer import chat_template_problem

    args = argparse.Namespace(chat_template=True, chat_template_kwargs=None, system_prompt="Be brief.")
    refusing = CHAT_TEMPLATE.replace("{% for m in messages %}", "{% if messages[0]['role'] == 'system' %}"
                                     "{{ raise_exception('System role not supported') }}{% endif %}"
                                     "{% for m in messages %}")
    dropping = CHAT_TEMPLATE.replace("{% for m in messages %}", "{% for m in messages if m['role'] != 'system' %}")
    for name, template, message in (("refuses", refusing, "refuses a system turn"),
                                    ("drops", dropping, "drops the system turn")):
        _hf_tokenizer(tmp_path / name, template)
        assert message in chat_template_problem(args, load_tokenizer(str(tmp_path / name)))
    _hf_tokenizer(tmp_path / "ok", CHAT_TEMPLATE)
    assert chat_template_problem(args, load_tokenizer(str(tmp_path / "ok"))) is None


@pytest.mark.parametrize("mode,extra,message", [
    ("prompts", (), "--system-prompt applies to --chat-template only"),
    ("sft", ("--chat-template",), "--system-prompt applies to --mode prompts"),
    ("dpo", ("--chat-template",), "--system-prompt applies to --mode prompts, not --mode dpo"),
])
def test_system_prompt_misuse_is_rejected(tmp_path, mode, extra, message):
    inp = write_jsonl(tmp_path / "p.jsonl", PROMPT_ROWS)
    res = run_tool("--mode", mode, "--input", inp, "--output-prefix", tmp_path / "x", "--tokenizer", "byte",
                   "--system-prompt", "Be brief.", *extra)
    assert res.returncode != 0 and message in res.stderr
    assert not list(tmp_path.glob("x*"))


@pytest.mark.parametrize("extra,message", [
    (("--chat-template-kwargs", "[1]"), "must be a JSON object"),
    (("--chat-template-kwargs", "{bad"), "not valid JSON"),
    (("--chat-template-kwargs", "{}"), "applies to --chat-template only"),
    (("--chat-template", "--chat-template-kwargs", '{"enable_thinking": false}'), "has no chat template"),
])
def test_bad_chat_template_kwargs_are_rejected(tmp_path, extra, message):
    inp = write_jsonl(tmp_path / "p.jsonl", PROMPT_ROWS)
    res = run_tool("--mode", "prompts", "--input", inp, "--output-prefix", tmp_path / "x",
                   "--tokenizer", "byte", *extra)
    assert res.returncode != 0 and message in res.stderr
    assert not list(tmp_path.glob("x*"))


def test_hf_chat_template_sft_masks(tmp_path, capsys):
    """A transformers tokenizer with its own chat template: masks cover exactly the assistant turns."""
    _hf_tokenizer(tmp_path / "tok", CHAT_TEMPLATE)
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                          {"role": "user", "content": "again"}, {"role": "assistant", "content": "you"}]}]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    rc, err = run_inproc(capsys, "--mode", "sft", "--input", inp, "--output-prefix", tmp_path / "d",
                         "--tokenizer", tmp_path / "tok", "--chat-template")
    assert rc == 0, err
    tok = load_tokenizer(str(tmp_path / "tok"))
    s = load_sft_dataset(str(tmp_path / "d"))[0]
    segs = ["<user>hi</s><assistant>", "hello</s>", "<user>again</s><assistant>", "you</s>"]
    want_ids = [i for seg in segs for i in tok.encode(seg)]
    want_mask = [k % 2 for k, seg in enumerate(segs) for _ in tok.encode(seg)]
    assert s.tokens.tolist() == want_ids and s.loss_mask.tolist() == want_mask
    assert tok.eos_id in s.tokens[s.loss_mask == 1].tolist()


# Qwen3-like history rewrite: an assistant turn before the last user message loses its reasoning
REWRITING_TEMPLATE = (
    "{% set ns = namespace(last_user=-1) %}"
    "{% for m in messages %}{% if m['role'] == 'user' %}{% set ns.last_user = loop.index0 %}"
    "{% endif %}{% endfor %}"
    "{% for m in messages %}{% set c = m['content'] %}"
    "{% if m['role'] == 'assistant' and loop.index0 < ns.last_user and '</think>' in c %}"
    "{% set c = c.split('</think>')[-1] %}{% endif %}"
    "<{{ m['role'] }}>{{ c }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}")
THINKING_CHAT = {"messages": [
    {"role": "user", "content": "hi"}, {"role": "assistant", "content": "<think>hmm</think>hello"},
    {"role": "user", "content": "again"}, {"role": "assistant", "content": "<think>so</think>you"}]}


def _segments_to_ids(tok, segs):
    """ids and loss mask of (text, is_response) segments, each tokenized on its own."""
    ids = [i for text, _ in segs for i in tok.encode(text)]
    mask = [m for text, m in segs for _ in tok.encode(text)]
    return ids, mask


def test_history_rewriting_template_trains_each_turn_in_its_inference_context(tmp_path, capsys):
    """Qwen3-style templates drop earlier reasoning: each assistant turn becomes a sample whose
    context is the template's rendering at that turn (what generation would have seen)."""
    _hf_tokenizer(tmp_path / "tok", REWRITING_TEMPLATE)
    plain = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                          {"role": "user", "content": "again"}, {"role": "assistant", "content": "you"}]}
    inp = write_jsonl(tmp_path / "in.jsonl", [THINKING_CHAT, plain])
    common = ("--mode", "sft", "--input", inp, "--tokenizer", tmp_path / "tok", "--chat-template")
    rc, err = run_inproc(capsys, *common, "--output-prefix", tmp_path / "auto")
    assert rc == 0, err
    tok = load_tokenizer(str(tmp_path / "tok"))
    want = [
        [("<user>hi</s><assistant>", 0), ("<think>hmm</think>hello</s>", 1)],
        [("<user>hi</s><assistant>hello</s><user>again</s><assistant>", 0),
         ("<think>so</think>you</s>", 1)],
        # no reasoning to drop: the conversation renders as one continuation, one sample
        [("<user>hi</s><assistant>", 0), ("hello</s>", 1), ("<user>again</s><assistant>", 0),
         ("you</s>", 1)],
    ]
    ds = load_sft_dataset(str(tmp_path / "auto"))
    assert len(ds) == 3
    for k, segs in enumerate(want):
        ids, mask = _segments_to_ids(tok, segs)
        assert ds[k].tokens.tolist() == ids and ds[k].loss_mask.tolist() == mask, k
    summary = json.loads((tmp_path / "auto.json").read_text())
    assert summary["split_conversations"] == 1 and summary["num_samples"] == 3
    assert summary["multi_turn"] == "auto"

    # joint refuses the rewritten history, naming the turn; nothing is written
    rc, err = run_inproc(capsys, *common, "--output-prefix", tmp_path / "joint", "--multi-turn", "joint")
    assert rc == 1 and "in.jsonl:1" in err and "messages[3]" in err and "--multi-turn" in err
    assert not list(tmp_path.glob("joint*"))

    # per-turn splits every conversation, also the one the template keeps intact
    rc, err = run_inproc(capsys, *common, "--output-prefix", tmp_path / "pt", "--multi-turn", "per-turn")
    assert rc == 0, err
    ds = load_sft_dataset(str(tmp_path / "pt"))
    per_turn = want[:2] + [want[2][:2], [("".join(t for t, _ in want[2][:3]), 0), want[2][3]]]
    assert len(ds) == 4
    for k, segs in enumerate(per_turn):
        ids, mask = _segments_to_ids(tok, segs)
        assert ds[k].tokens.tolist() == ids and ds[k].loss_mask.tolist() == mask, k
    assert json.loads((tmp_path / "pt.json").read_text())["split_conversations"] == 2


def test_multi_turn_applies_to_sft_only(tmp_path):
    inp = write_jsonl(tmp_path / "p.jsonl", PROMPT_ROWS)
    res = run_tool("--mode", "prompts", "--input", inp, "--output-prefix", tmp_path / "x",
                   "--tokenizer", "byte", "--multi-turn", "per-turn")
    assert res.returncode != 0 and "--multi-turn per-turn applies to --mode sft only" in res.stderr


def test_cli_help_and_bad_options(tmp_path):
    res = run_tool("--help")
    assert res.returncode == 0 and "--output-prefix" in res.stdout and "--skip-bad-lines" in res.stdout
    inp = write_jsonl(tmp_path / "p.jsonl", PROMPT_ROWS)
    res = run_tool("--mode", "prompts", "--input", inp, "--output-prefix", tmp_path / "x",
                   "--tokenizer", tmp_path / "no-such-tokenizer")
    assert res.returncode != 0 and "no-such-tokenizer" in res.stderr
    res = run_tool("--mode", "prompts", "--input", inp, "--output-prefix", tmp_path / "x",
                   "--tokenizer", "byte", "--append-eos")
    assert res.returncode != 0 and "--append-eos" in res.stderr
    assert existing_outputs(tmp_path / "x") == []


def test_failure_during_commit_leaves_nothing(tmp_path, capsys, monkeypatch):
    """A failure while renaming into place removes what was already renamed."""
    inp = write_jsonl(tmp_path / "in.jsonl", SFT_ROWS)
    real_replace = os.replace
    calls = []

    def flaky(src, dst):
        calls.append(dst)
        if len(calls) == 3:
            raise OSError("disk full (simulated)")
        return real_replace(src, dst)

    monkeypatch.setattr(tool.os, "replace", flaky)
    with pytest.raises(OSError, match="simulated"):
        tool.main(["--mode", "sft", "--input", str(inp), "--output-prefix", str(tmp_path / "d"),
                   "--tokenizer", "byte"])
    assert len(calls) == 3
    assert [p for p in os.listdir(tmp_path) if p != "in.jsonl"] == []


# -- the readers ----------------------------------------------------------------------------
def test_read_prompt_records_and_skip_bad(tmp_path):
    inp = write_jsonl(tmp_path / "p.jsonl", PROMPT_ROWS + ['{"id": "q", "prompt": "x", "task": "code", "tests": []}'])
    with pytest.raises(DataError) as ei:
        list(read_prompt_records(inp))
    assert ei.value.line == 4 and ei.value.field == "tests" and f"{inp}:4:" in str(ei.value)
    reader = read_prompt_records(inp, skip_bad=True)
    recs = list(reader)
    assert [r["id"] for r in recs] == ["m1", "c1", "p.jsonl:3"]
    assert reader.skipped == 1 and reader.errors[0].field == "tests"
    assert list(reader) == recs  # iterable again (duplicate-id state is per iteration)


def test_read_jsonl_generic(tmp_path):
    inp = write_jsonl(tmp_path / "g.jsonl", [{"prompt": "a"}, {"prompt_ids": [1, 2]}, {"prompt_ids": [1, True]}])
    with pytest.raises(DataError) as ei:
        list(read_jsonl(inp, validate=validate_generation_record))
    assert ei.value.line == 3 and ei.value.field == "prompt_ids[1]"
    got = list(read_jsonl(inp, validate=validate_generation_record, skip_bad=True, with_lineno=True))
    assert got == [(1, {"prompt": "a"}), (2, {"prompt_ids": [1, 2]})]
    with pytest.raises(DataError, match=r"g.jsonl:2: field 'prompt': missing"):
        list(read_jsonl(inp, required=["prompt"]))
    with pytest.raises(DataError, match=r"g.jsonl:1: field 'prompt': expected int"):
        list(read_jsonl(inp, required={"prompt": int}))
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="empty"):
        list(read_jsonl(tmp_path / "e.jsonl"))


# -- the on-disk format ------------------------------------------------------------------------
def test_indexed_format_matches_megatron_core(tmp_path):
    """Our writer's files are byte-identical to megatron-core's builder's, and megatron-core's
    IndexedDataset reads ours."""
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 260, size=n).tolist() for n in (5, 1, 17, 0, 9)]
    for dtype in (np.uint16, np.int32, np.uint8):
        vals = [[v % 256 for v in s] for s in seqs] if dtype == np.uint8 else seqs
        ours, theirs = str(tmp_path / f"ours_{dtype.__name__}"), str(tmp_path / f"theirs_{dtype.__name__}")
        w = IndexedDatasetWriter(ours + ".bin", ours + ".idx", dtype)
        b = IndexedDatasetBuilder(theirs + ".bin", dtype=dtype)
        for s in vals:
            w.add(s)
            b.add_item(torch.tensor(s, dtype=torch.int64))
            b.end_document()
        w.finalize()
        b.finalize(theirs + ".idx")
        for ext in (".bin", ".idx"):
            assert Path(ours + ext).read_bytes() == Path(theirs + ext).read_bytes(), (dtype, ext)
        mds = IndexedDataset(ours)
        mine = IndexedTokens(theirs)
        assert len(mds) == len(mine) == len(vals)
        for i, s in enumerate(vals):
            assert mds[i].tolist() == s and mine[i].tolist() == s
    w = IndexedDatasetWriter(str(tmp_path / "o.bin"), str(tmp_path / "o.idx"), np.uint16)
    with pytest.raises(ValueError, match="does not fit"):
        w.add([70000])
    w.abort()
    assert not (tmp_path / "o.bin").exists()


def test_a_json_array_file_reads_like_jsonl_and_errors_name_the_elements_line(tmp_path, capsys):
    """Alpaca's alpaca_data.json is one pretty-printed JSON array: its elements are the records
    (the same samples as the JSONL form); a bad element is reported at the line it starts on,
    a syntax error at its own line."""
    rows = [{"instruction": "Say hi.", "input": "", "output": "hi"},
            {"instruction": "Translate.", "input": "chat\nchien", "output": "cat dog é"}]
    (tmp_path / "alpaca.json").write_text(json.dumps(rows, indent=4, ensure_ascii=False), encoding="utf-8")
    write_jsonl(tmp_path / "alpaca.jsonl", rows)
    samples = {}
    for name in ("alpaca.json", "alpaca.jsonl"):
        rc, err = run_inproc(capsys, "--mode", "sft", "--input", tmp_path / name, "--output-prefix",
                             tmp_path / name.replace(".", "_"), "--tokenizer", "byte")
        assert rc == 0, err
        ds = load_sft_dataset(str(tmp_path / name.replace(".", "_")))
        samples[name] = [(x.tokens.tolist(), x.loss_mask.tolist()) for x in ds]
    assert samples["alpaca.json"] == samples["alpaca.jsonl"] and len(samples["alpaca.json"]) == 2

    bad = rows + [{"instruction": "no output"}]
    (tmp_path / "in_bad.json").write_text(json.dumps(bad, indent=4), encoding="utf-8")
    start = json.dumps(bad, indent=4).splitlines().index("    {", 10) + 1  # the third element's first line
    rc, err = run_inproc(capsys, "--mode", "sft", "--input", tmp_path / "in_bad.json", "--output-prefix",
                         tmp_path / "bad", "--tokenizer", "byte")
    assert rc != 0 and f"in_bad.json:{start}: field 'output'" in err and existing_outputs(tmp_path / "bad") == []
    (tmp_path / "syntax.json").write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": }\n]')
    rc, err = run_inproc(capsys, "--mode", "sft", "--input", tmp_path / "syntax.json", "--output-prefix",
                         tmp_path / "syntax", "--tokenizer", "byte")
    assert rc != 0 and "syntax.json:3: invalid JSON" in err


def test_gsm8k_and_math_records_become_prompt_and_answer(tmp_path):
    """GSM8K's question / "... #### N" answer and MATH's problem / boxed solution preprocess to
    prompt + answer, which the math reward then grades; our own fields are left as given."""
    from megatron_k15.rewards.math import math_reward

    rows = [{"question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = 7\n#### 7"},
            {"problem": "Solve 2x = 1.", "solution": "Divide: $x = \\boxed{\\frac{1}{2}}$.", "level": "Level 1"},
            {"question": "A big sum?", "answer": "It is 1,000.\n#### 1,000"},
            {"prompt": "Keep mine.", "answer": "a #### b"}]
    prefix = tmp_path / "math"
    res = run_tool("--mode", "prompts", "--input", write_jsonl(tmp_path / "in.jsonl", rows), "--output-prefix",
                   prefix, "--tokenizer", "byte", "--no-progress")
    assert res.returncode == 0, res.stderr
    recs = load_prompt_dataset(str(prefix)).records
    assert [(r["prompt"], r["answer"], r["task"]) for r in recs] == [
        ("Tom has 3 apples and buys 4. How many?", "7", "math"), ("Solve 2x = 1.", "\\frac{1}{2}", "math"),
        ("A big sum?", "1,000", "math"), ("Keep mine.", "a #### b", "math")]
    assert recs[1]["level"] == "Level 1" and "question" not in recs[0]
    assert math_reward("So the answer is \\boxed{7}.", recs[0]) == 1.0
    assert math_reward("x = \\boxed{0.5}", recs[1]) == 1.0 and math_reward("\\boxed{1000}", recs[2]) == 1.0
    bad_input = write_jsonl(tmp_path / "bad.jsonl", [{"problem": "p", "solution": "no box"}])
    bad = run_tool("--mode", "prompts", "--input", bad_input, "--output-prefix", tmp_path / "b", "--tokenizer",
                   "byte", "--no-progress")
    assert bad.returncode != 0 and "bad.jsonl:1: field 'solution': has no \\boxed{} answer" in bad.stderr


def test_our_fields_win_and_one_line_arrays_get_positional_ids(tmp_path, capsys):
    """A line with our own fields is read by them even when it also carries ShareGPT/Alpaca
    keys; an empty ShareGPT system prompt adds no message; a JSON array written on one line
    (json.dump's default) gets ids by position, not the shared line."""
    from megatron_k15.data.prompts import validate_sft_record

    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert validate_sft_record({"messages": msgs, "output": "x", "instruction": "y"}) == {"messages": msgs}
    both = validate_sft_record({"prompt": "q", "response": "a", "conversations": [{"from": "human", "value": "z"}]})
    assert both["messages"] == msgs and both["pair"]
    assert validate_sft_record({"system": "", "conversations": [{"from": "human", "value": "q"},
                                                                 {"from": "gpt", "value": "a"}]}) == {"messages": msgs}
    rows = [{"question": "1+1?", "answer": "2\n#### 2"}, {"question": "2+2?", "answer": "#### 4"}]
    (tmp_path / "gsm.json").write_text(json.dumps(rows))  # one line
    rc, err = run_inproc(capsys, "--mode", "prompts", "--input", tmp_path / "gsm.json", "--output-prefix",
                         tmp_path / "out", "--tokenizer", "byte")
    assert rc == 0, err
    assert [(r["id"], r["answer"]) for r in load_prompt_dataset(str(tmp_path / "out")).records] == [
        ("gsm.json:1", "2"), ("gsm.json:2", "4")]


def test_parquet_rows_read_as_jsonl_lines(tmp_path, capsys, monkeypatch):
    """A Parquet file (Hugging Face datasets' format) preprocesses to the same files as the
    same rows in JSONL; errors name the row; without pyarrow the message says what to do."""
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    from megatron_k15.data.prompts import input_size, read_prompt_records

    rows = [{"id": f"q{i}", "question": f"{i} + {i}?", "answer": f"so\n#### {2 * i}", "level": i % 3}
            for i in range(40)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "gsm.parquet", row_group_size=16)
    write_jsonl(tmp_path / "gsm.jsonl", rows)
    for name in ("gsm.parquet", "gsm.jsonl"):
        rc, err = run_inproc(capsys, "--mode", "prompts", "--input", tmp_path / name, "--output-prefix",
                             tmp_path / name.replace(".", "_"), "--tokenizer", "byte")
        assert rc == 0, err
    for suffix in (".bin", ".idx", ".meta.jsonl"):
        assert (tmp_path / f"gsm_parquet{suffix}").read_bytes() == (tmp_path / f"gsm_jsonl{suffix}").read_bytes()
    assert input_size(str(tmp_path / "gsm.parquet")) == (40, "rows")

    bad = [dict(r) for r in rows[:5]]
    bad[2]["answer"] = None  # row 3: a math prompt without an answer
    pq.write_table(pa.Table.from_pylist(bad), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"bad.parquet:3: field 'task': missing \(and no 'answer'"):
        list(read_prompt_records(str(tmp_path / "bad.parquet")))
    rc, err = run_inproc(capsys, "--mode", "prompts", "--input", tmp_path / "bad.parquet", "--output-prefix",
                         tmp_path / "out" / "bad", "--tokenizer", "byte")
    assert rc != 0 and "bad.parquet:3: field 'task'" in err and existing_outputs(tmp_path / "out" / "bad") == []

    (tmp_path / "broken.parquet").write_bytes(b"PAR1" + b"\0" * 64)
    with pytest.raises(DataError, match="broken.parquet: is not a readable Parquet file"):
        list(read_prompt_records(str(tmp_path / "broken.parquet")))
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # as if pyarrow were not installed
    with pytest.raises(DataError, match="reading it needs pyarrow"):
        list(read_prompt_records(str(tmp_path / "gsm.parquet")))


def test_several_inputs_make_one_dataset(tmp_path, capsys):
    """--input A B C (a dataset's Parquet shards, JSONL, mixed) gives the files of their lines
    concatenated; a repeated id names the file it first came from; an empty file is named."""
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    rows = [{"id": f"q{i}", "prompt": f"{i} + 1?", "answer": str(i + 1)} for i in range(30)]
    pq.write_table(pa.Table.from_pylist(rows[:10]), tmp_path / "train-00000-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(rows[10:20]), tmp_path / "train-00001-of-00002.parquet")
    write_jsonl(tmp_path / "extra.jsonl", rows[20:])
    write_jsonl(tmp_path / "all.jsonl", rows)
    shards = [tmp_path / "train-00000-of-00002.parquet", tmp_path / "train-00001-of-00002.parquet",
              tmp_path / "extra.jsonl"]
    rc, err = run_inproc(capsys, "--mode", "prompts", "--input", *shards, "--output-prefix", tmp_path / "many",
                         "--tokenizer", "byte")
    assert rc == 0, err
    rc, err = run_inproc(capsys, "--mode", "prompts", "--input", tmp_path / "all.jsonl", "--output-prefix",
                         tmp_path / "one", "--tokenizer", "byte")
    assert rc == 0, err
    for suffix in (".bin", ".idx", ".meta.jsonl"):
        assert (tmp_path / f"many{suffix}").read_bytes() == (tmp_path / f"one{suffix}").read_bytes()
    summary = json.loads((tmp_path / "many.json").read_text())
    assert summary["input"] == [str(p) for p in shards] and summary["lines"] == 30

    write_jsonl(tmp_path / "again.jsonl", [rows[3]])
    rc, err = run_inproc(capsys, "--mode", "prompts", "--input", shards[0], tmp_path / "again.jsonl",
                         "--output-prefix", tmp_path / "dup" / "d", "--tokenizer", "byte")
    assert rc != 0 and f"again.jsonl:1: field 'id': duplicate id 'q3' (first on {shards[0]}:4)" in err
    assert existing_outputs(tmp_path / "dup" / "d") == []
    # id-less records in same-named shards of two folders (Hugging Face's layout) get ids by
    # their path from the common folder, not one shared file name
    for sub, n in (("main", 2), ("socratic", 3)):
        (tmp_path / sub).mkdir()
        pq.write_table(pa.Table.from_pylist([{"question": f"{sub} {i}?", "answer": f"#### {i}"} for i in range(n)]),
                       tmp_path / sub / "train-00000-of-00001.parquet")
    rc, err = run_inproc(capsys, "--mode", "prompts", "--input", tmp_path / "main" / "train-00000-of-00001.parquet",
                         tmp_path / "socratic" / "train-00000-of-00001.parquet", "--output-prefix", tmp_path / "gsm",
                         "--tokenizer", "byte")
    assert rc == 0, err
    ids = [json.loads(line)["id"] for line in open(tmp_path / "gsm.meta.jsonl")]
    assert ids == ["main/train-00000-of-00001.parquet:1", "main/train-00000-of-00001.parquet:2",
                   "socratic/train-00000-of-00001.parquet:1", "socratic/train-00000-of-00001.parquet:2",
                   "socratic/train-00000-of-00001.parquet:3"]
    (tmp_path / "empty.jsonl").write_text("\n")
    rc, err = run_inproc(capsys, "--mode", "prompts", "--input", tmp_path / "all.jsonl", tmp_path / "empty.jsonl",
                         "--output-prefix", tmp_path / "e" / "e", "--tokenizer", "byte")
    assert rc != 0 and "empty.jsonl:1: file is empty" in err and existing_outputs(tmp_path / "e" / "e") == []


TOY_TOKENIZER_CODE = '''
from transformers import PreTrainedTokenizer


class ToyTokenizer(PreTrainedTokenizer):
    """Letters and space as ids 3.., </s> 2: a tokenizer only its own code can load."""

    def __init__(self, **kwargs):
        self._vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
        self._vocab.update({c: 3 + i for i, c in enumerate("abcdefghijklmnopqrstuvwxyz ")})
        self._inv = {v: k for k, v in self._vocab.items()}
        super().__init__(**kwargs)

    @property
    def vocab_size(self):
        return len(self._vocab)

    def get_vocab(self):
        return dict(self._vocab)

    def _tokenize(self, text, **kwargs):
        return [c for c in text.lower() if c in self._vocab]

    def _convert_token_to_id(self, token):
        return self._vocab.get(token, 0)

    def _convert_id_to_token(self, index):
        return self._inv.get(index, "<pad>")

    def save_vocabulary(self, save_directory, filename_prefix=None):
        return ()
'''


def test_tokenizer_with_its_own_code_needs_trust_remote_code(tmp_path, capsys, monkeypatch):
    """Moonlight's and Kimi K2's tokenizers ship their own code (tokenizer_config.json's
    auto_map). Without --trust-remote-code the tool stops and names the flag; with it the
    prompts are tokenized by that code, with several workers too (they inherit the permission),
    and a checkpoint's copy of the tokenizer carries the code."""
    from megatron_k15.data.tokenizer import TRUST_REMOTE_CODE_ENV, load_tokenizer, save_tokenizer

    monkeypatch.setenv(TRUST_REMOTE_CODE_ENV, "0")  # not trusted; restored (unset) after the test
    import transformers.dynamic_module_utils as dynamic_modules  # the code is copied there: keep ~/.cache clean

    modules = str(tmp_path / "hf_modules")
    monkeypatch.setenv("HF_MODULES_CACHE", modules)  # for the worker processes
    monkeypatch.setattr(dynamic_modules, "HF_MODULES_CACHE", modules)
    tok_dir = tmp_path / "toy"
    tok_dir.mkdir()
    (tok_dir / "tokenization_toy.py").write_text(TOY_TOKENIZER_CODE)
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({
        "auto_map": {"AutoTokenizer": ["tokenization_toy.ToyTokenizer", None]}, "tokenizer_class": "ToyTokenizer",
        "eos_token": "</s>", "bos_token": "<s>", "pad_token": "<pad>"}))
    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "prompt": "hello world", "answer": "1"},
                                              {"id": "b", "prompt": "abc", "answer": "2"}])
    prefix = tmp_path / "out" / "pr"
    rc, err = run_inproc(capsys, "--mode", "prompts", "--input", inp, "--output-prefix", prefix,
                         "--tokenizer", tok_dir)
    assert rc != 0 and "--trust-remote-code" in err and existing_outputs(prefix) == []
    for workers in ("1", "2"):  # 2 worker processes: the CLI in a process of its own
        out = tmp_path / f"out{workers}" / "pr"
        args = ("--mode", "prompts", "--input", inp, "--output-prefix", out, "--tokenizer", tok_dir,
                "--trust-remote-code", "--workers", workers)
        if workers == "1":
            rc, err = run_inproc(capsys, *args)
        else:
            res = run_tool(*args)
            rc, err = res.returncode, res.stderr
        assert rc == 0, err
        prompts = load_prompt_dataset(str(out))
        assert [list(prompts.tokens[i]) for i in range(2)] == [[10, 7, 14, 14, 17, 29, 25, 17, 20, 14, 6], [3, 4, 5]]
    saved = save_tokenizer(load_tokenizer(str(tok_dir)), str(tmp_path / "ckpt" / "tokenizer"))
    assert "tokenization_toy.py" in os.listdir(saved)
    assert load_tokenizer(str(tmp_path / "ckpt")).encode("hello") == [10, 7, 14, 14, 17]
