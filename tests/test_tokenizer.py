"""Tokenizers: byte-level and HF (built offline in the test), chat templates, save/load."""

import json
import os

import pytest

from megatron_k15.data.tokenizer import (
    ByteTokenizer,
    HFTokenizer,
    TokenizerError,
    load_tokenizer,
    save_tokenizer,
    simple_chat_template,
)

TEXTS = ["hello world", "héllo wörld ✓", "数学 2+2=4 🙂", "line1\nline2\ttab", ""]


def _train_bpe(path):
    """A tiny byte-level BPE trained on a few strings, saved as tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tk.train_from_iterator(["hello world", "the quick brown fox", "héllo wörld ✓ 数学"] * 4, trainer)
    tk.save(str(path))
    return tk


@pytest.fixture(scope="module")
def bpe_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("bpe")
    _train_bpe(d / "tokenizer.json")
    return d / "tokenizer.json"


TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}</s>{% endfor %}"
            "{% if add_generation_prompt %}[assistant]{% endif %}")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, bpe_file):
    """A transformers tokenizer directory (tokenizer_config.json) with a chat template."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    d = tmp_path_factory.mktemp("hfdir")
    fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_file(str(bpe_file)),
                                   bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    fast.chat_template = TEMPLATE
    fast.save_pretrained(str(d))
    (d / "model.safetensors").write_bytes(b"not a tokenizer file")  # must not be copied
    return d


def test_byte_tokenizer_matches_tiny_preset():
    from megatron_k15.models.config import PRESETS

    tok = load_tokenizer("byte")
    assert isinstance(tok, ByteTokenizer)
    tiny = PRESETS["tiny"]
    assert tok.vocab_size == tiny["vocab_size"] == 260
    assert tok.bos_id == tiny["bos_token_id"] == 256
    assert tok.eos_id == tiny["eos_token_id"] == 257
    assert tok.pad_id == 258
    assert tok.name == "byte"


@pytest.mark.parametrize("text", TEXTS)
def test_byte_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text


def test_byte_decode_skips_specials_and_replaces_bad_utf8():
    tok = ByteTokenizer()
    ids = [tok.bos_id] + tok.encode("ok ✓") + [tok.eos_id, tok.pad_id, 259]
    assert tok.decode(ids) == "ok ✓"
    # a multi-byte character cut in half decodes with the replacement character
    assert tok.decode(tok.encode("✓")[:2] + tok.encode("a")) == "\ufffda"
    with pytest.raises(ValueError):
        tok.decode([260])


def test_simple_chat_template():
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert simple_chat_template(msgs) == "<|system|>\nbe brief\n<|user|>\nhi\n<|assistant|>\n"
    tok = load_tokenizer("byte")
    assert tok.apply_chat_template([{"role": "user", "content": "2+2?"}]) == "<|user|>\n2+2?\n<|assistant|>\n"
    assert tok.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=False) == "<|user|>\nx\n"
    with pytest.raises(ValueError):
        simple_chat_template([{"role": "user"}])


def test_hf_tokenizer_json_round_trip(bpe_file):
    from tokenizers import Tokenizer

    ref = Tokenizer.from_file(str(bpe_file))
    for spec in (str(bpe_file), str(bpe_file.parent)):  # the file, or a directory holding it
        tok = load_tokenizer(spec)
        assert isinstance(tok, HFTokenizer) and tok.backend == "tokenizers"
        assert tok.vocab_size == ref.get_vocab_size(with_added_tokens=True)
        assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 3)
        for text in TEXTS:
            ids = tok.encode(text)
            assert ids == ref.encode(text, add_special_tokens=False).ids
            assert tok.decode(ids) == text
        ids = tok.encode("hello world")
        assert tok.eos_id not in ids and tok.bos_id not in ids  # no special tokens added
        assert tok.decode([tok.bos_id] + ids + [tok.eos_id]) == "hello world"
        # no template of its own: the simple one
        assert not tok.has_chat_template
        assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "<|user|>\nhi\n<|assistant|>\n"


def test_transformers_dir_chat_template_and_save(hf_dir, tmp_path):
    tok = load_tokenizer(str(hf_dir))
    assert isinstance(tok, HFTokenizer) and tok.backend == "transformers"
    assert tok.has_chat_template
    assert tok.eos_id == 2 and tok.bos_id == 1 and tok.pad_id == 3
    msgs = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(msgs) == "[user]hi</s>[assistant]"
    assert tok.apply_chat_template(msgs, add_generation_prompt=False) == "[user]hi</s>"
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("hi</s>")[-1] == tok.eos_id  # special token text maps to its id

    ckpt = tmp_path / "ckpt"
    save_tokenizer(tok, str(ckpt / "tokenizer"))
    copied = sorted(os.listdir(ckpt / "tokenizer"))
    assert "tokenizer.json" in copied and "tokenizer_config.json" in copied
    assert "model.safetensors" not in copied
    for f in copied:  # verbatim copies
        assert (ckpt / "tokenizer" / f).read_bytes() == (hf_dir / f).read_bytes()
    again = load_tokenizer(str(ckpt))  # a checkpoint directory: finds tokenizer/
    assert again.encode("héllo wörld ✓") == tok.encode("héllo wörld ✓")
    assert again.apply_chat_template(msgs) == tok.apply_chat_template(msgs)


def test_save_load_byte_tokenizer(tmp_path, bpe_file):
    ckpt = tmp_path / "ckpt"
    save_tokenizer(load_tokenizer("byte"), str(ckpt / "tokenizer"))
    spec = json.loads((ckpt / "tokenizer" / "byte_tokenizer.json").read_text())
    assert spec["type"] == "byte"
    assert isinstance(load_tokenizer(str(ckpt)), ByteTokenizer)
    assert isinstance(load_tokenizer(str(ckpt / "tokenizer")), ByteTokenizer)
    assert isinstance(load_tokenizer(str(ckpt / "tokenizer" / "byte_tokenizer.json")), ByteTokenizer)
    # a bare tokenizer.json saved from a file spec
    out = tmp_path / "tk"
    save_tokenizer(load_tokenizer(str(bpe_file)), str(out))
    assert (out / "tokenizer.json").read_bytes() == bpe_file.read_bytes()
    assert isinstance(load_tokenizer(str(out)), HFTokenizer)


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(TokenizerError, match="no such file"):
        load_tokenizer(str(tmp_path / "missing"))
    with pytest.raises(TokenizerError, match="no tokenizer_config.json"):
        load_tokenizer(str(tmp_path))  # an empty directory
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(TokenizerError, match="bad.json"):
        load_tokenizer(str(bad))
