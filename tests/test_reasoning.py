"""Grading reasoning models: the verifier sees the answer after the reasoning block; a response
still inside its reasoning scores 0; plain models are graded as before."""

import pytest

from megatron_k15.arguments import ArgumentError
from megatron_k15.data.tokenizer import ByteTokenizer
from megatron_k15.generation.replay_buffer import Trajectory
from megatron_k15.rewards.reasoning import (ReasoningTags, graded_text, parse_reasoning_tags,
                                            prompt_opens_reasoning, reward_of_response,
                                            tags_survive_decoding)
from megatron_k15.rl.trainer import score

THINK = ReasoningTags()
FOUR = {"id": "p", "task": "math", "answer": "4"}


@pytest.mark.parametrize("response,prompt_open,expected", [
    ("The answer is \\boxed{4}.", False, "The answer is \\boxed{4}."),                 # plain model
    ("<think>2+2=\\boxed{5}? no</think>\n\n\\boxed{4}", False, "\n\n\\boxed{4}"),      # Qwen3
    ("<think>a</think> b <think>c</think> d", False, " d"),                           # last block
    ("<think>so it is \\boxed{4}", False, None),                                      # ran out thinking
    ("<think>a</think> b <think>c", False, None),                                     # reopened
    ("so it is \\boxed{4}", True, None),                  # R1: the prompt opened the block
    ("so \\boxed{5}</think>\\boxed{4}", True, "\\boxed{4}"),                          # R1, closed
])
def test_graded_text(response, prompt_open, expected):
    assert graded_text(response, THINK, prompt_open) == expected


def test_no_tags_grade_everything_and_custom_tags_work():
    assert graded_text("<think>\\boxed{4}", None) == "<think>\\boxed{4}"
    tags = parse_reasoning_tags("<reasoning>,</reasoning>")
    assert graded_text("<reasoning>x</reasoning>y", tags) == "y"
    assert graded_text("<think>x", tags) == "<think>x"  # other tags are text
    assert prompt_opens_reasoning("<|im_start|>assistant\n<think>\n", THINK)  # R1-style template
    assert not prompt_opens_reasoning("<|im_start|>assistant\n", THINK)
    assert not prompt_opens_reasoning("<think>\n\n</think>\n\n", THINK)  # Qwen3, thinking off
    assert not prompt_opens_reasoning("Reason inside <think> tags.\nassistant\n", THINK)  # instruction
    assert not prompt_opens_reasoning("<think>\n", None)


def test_tags_that_decoding_drops_are_detected(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from megatron_k15.data.tokenizer import load_tokenizer

    assert tags_survive_decoding(ByteTokenizer(), THINK)
    vocab = {c: i for i, c in enumerate("ab<>/thinkx")}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="x"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="x")
    fast.add_special_tokens({"additional_special_tokens": ["<think>", "</think>"]})
    fast.save_pretrained(str(tmp_path / "tok"))
    assert not tags_survive_decoding(load_tokenizer(str(tmp_path / "tok")), THINK)


@pytest.mark.parametrize("spec", ["<think>", "a,b,c", ",</think>", "<t>,<t>", ""])
def test_bad_tag_specs_are_rejected(spec):
    with pytest.raises(ValueError, match="--reasoning-tags"):
        parse_reasoning_tags(spec)


def test_reward_of_response_grades_only_the_answer():
    boxed_while_thinking = "<think>maybe \\boxed{4}? check: 2+2 = 5</think> \\boxed{5}"
    assert reward_of_response(boxed_while_thinking, FOUR, None) == 0.0  # last boxed is 5 anyway
    unfinished = "<think>2+2 = \\boxed{4}, let me double check"
    assert reward_of_response(unfinished, FOUR, None) == 1.0  # graded whole: rewards a truncation
    assert reward_of_response(unfinished, FOUR, THINK) == 0.0
    assert reward_of_response("<think>easy</think>\\boxed{4}", FOUR, THINK) == 1.0
    assert reward_of_response("\\boxed{4}", FOUR, THINK, prompt_open=True) == 0.0


def test_rl_score_uses_the_tags_and_the_prompt():
    tok = ByteTokenizer()
    texts = ["<think>\\boxed{4}", "<think>ok</think>\\boxed{4}", "\\boxed{4}"]
    trajs = []
    for t in texts:
        ids = tok.encode(t)
        trajs.append(Trajectory(prompt_id="p", prompt_ids=tok.encode("2+2="), response_ids=ids,
                                segment_ids=[0] * len(ids), logprobs=[0.0] * len(ids), group_id="g",
                                stop_reason="eos"))
    _, correct = score(trajs, {"p": FOUR}, tok, 0)
    assert correct == [True, True, True]
    _, correct = score(trajs, {"p": FOUR}, tok, 0, reasoning_tags=THINK)
    assert correct == [False, True, True]
    _, correct = score(trajs, {"p": FOUR}, tok, 0, reasoning_tags=THINK, prompt_open=lambda pid: True)
    assert correct == [False, True, False]


def test_cli_rejects_a_bad_spec_naming_the_flag():
    import argparse

    from megatron_k15.arguments import check_reasoning_tags

    with pytest.raises(ArgumentError, match="--reasoning-tags"):
        check_reasoning_tags(argparse.Namespace(reasoning_tags="<think>"))
    check_reasoning_tags(argparse.Namespace(reasoning_tags="none"))


HARMONY_MARKERS = ["<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|return|>", "<|call|>"]


@pytest.mark.parametrize("response,expected", [
    ("<|channel|>analysis<|message|>2+2 is \\boxed{5}? no<|end|><|start|>assistant<|channel|>final<|message|>"
     "\\boxed{4}<|return|>", "\\boxed{4}"),                                         # analysis, then final
    ("<|channel|>final<|message|>4<|end|>", "4"),                                  # straight to the answer
    ("<|channel|>analysis<|message|>so \\boxed{4}", None),                         # still analysing
    ("The answer is 4", "The answer is 4"),                                        # no channels at all
])
def test_harmony_grades_the_final_channel(response, expected):
    assert graded_text(response, parse_reasoning_tags("harmony")) == expected


def test_harmony_tokens_are_special_yet_the_grader_sees_them(tmp_path):
    """gpt-oss's channel markers are special tokens: decoding drops them, so harmony responses
    are decoded with them kept (only EOS and padding go), and RL grades the final channel."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from megatron_k15.data.tokenizer import load_tokenizer
    from megatron_k15.rewards.reasoning import HARMONY, response_text

    vocab = {c: i for i, c in enumerate("0123456789+=\\{}abcdefghijklmnopqrstuvwxyz ?")}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="?"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tk.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="?", eos_token="<|return|>", pad_token="<|pad|>")
    fast.add_special_tokens({"additional_special_tokens": [m for m in HARMONY_MARKERS if m != "<|return|>"]})
    fast.save_pretrained(str(tmp_path / "tok"))
    tok = load_tokenizer(str(tmp_path / "tok"))
    text = ("<|channel|>analysis<|message|>maybe \\boxed{5}<|end|><|start|>assistant<|channel|>final<|message|>"
            "\\boxed{4}<|return|>")
    ids = tok.encode(text)
    assert "<|channel|>" not in tok.decode(ids)  # what a plain decode gives the grader
    assert response_text(tok, ids, None, HARMONY) == text[:-len("<|return|>")]
    analysing = tok.encode("<|channel|>analysis<|message|>so \\boxed{4}")
    trajs = [Trajectory(prompt_id="p", prompt_ids=tok.encode("2+2="), response_ids=r, segment_ids=[0] * len(r),
                        logprobs=[0.0] * len(r), group_id="g", stop_reason="eos") for r in (ids, analysing)]
    assert score(trajs, {"p": FOUR}, tok, 0, reasoning_tags=HARMONY)[1] == [True, False]
    # <think> tags: the markers vanish, responses are graded whole and the unfinished analysis scores
    assert score(trajs, {"p": FOUR}, tok, 0, reasoning_tags=THINK)[1] == [True, True]
