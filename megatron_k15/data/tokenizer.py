"""Tokenizers: a built-in byte-level one and HF tokenizers, behind one small interface.

``load_tokenizer(spec)`` accepts

- ``"byte"``: the built-in :class:`ByteTokenizer` (ids 0..255 are bytes, 256 BOS, 257 EOS,
  258 PAD, 259 reserved; ``vocab_size`` 260, matching the ``tiny`` model preset);
- a path to a ``tokenizer.json`` file (loaded with ``tokenizers.Tokenizer.from_file``);
- a directory holding ``tokenizer_config.json`` (loaded with
  ``transformers.AutoTokenizer.from_pretrained(dir, local_files_only=True)``), or only a
  ``tokenizer.json``, or a ``byte_tokenizer.json`` written by :func:`save_tokenizer`;
- a directory with a ``tokenizer/`` sub-directory holding any of the above (a checkpoint
  directory carries its tokenizer that way).

Nothing here touches the network, and importing this module imports neither torch nor
megatron-core nor transformers (those are loaded only when a spec needs them).

Every tokenizer has ``encode(text) -> list[int]`` (no special tokens added),
``decode(ids) -> str`` (special tokens skipped), ``vocab_size``, ``eos_id``, ``bos_id``,
``pad_id``, ``name`` and ``apply_chat_template(messages, add_generation_prompt=True) -> str``.
A tokenizer that ships its own code (``auto_map``: Moonlight's, Kimi K2's) loads only after
``allow_remote_code()`` (``--trust-remote-code``); checkpoints carry that code with it.

The simple chat template (used by the byte tokenizer and by HF tokenizers without a chat
template of their own) renders each message as ``"<|{role}|>\\n{content}\\n"`` and, when
``add_generation_prompt``, appends ``"<|assistant|>\\n"``. For one user turn ``"hi"`` that is
``"<|user|>\\nhi\\n<|assistant|>\\n"``. The markers are plain text, not special tokens.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Iterable, Optional, Sequence

__all__ = [
    "Tokenizer",
    "ByteTokenizer",
    "HFTokenizer",
    "TokenizerError",
    "load_tokenizer",
    "save_tokenizer",
    "simple_chat_template",
    "BYTE_TOKENIZER_FILE",
]

BYTE_TOKENIZER_FILE = "byte_tokenizer.json"

# Files that make up an HF tokenizer; save_tokenizer copies these (never model weights).
_HF_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "chat_template.jinja",
    "chat_template.json",
    "tiktoken.model",  # Moonlight / Kimi K2's tiktoken vocabulary (with tokenization_*.py code)
)
# --trust-remote-code: an environment variable, so processes started from this one (tokenizer
# workers) inherit it
TRUST_REMOTE_CODE_ENV = "MEGATRON_K15_TRUST_REMOTE_CODE"


def is_tokenizer_file(name: str) -> bool:
    """Whether a model directory's file belongs to its tokenizer (what a checkpoint's
    ``tokenizer/`` gets: its vocabulary, configs, templates and its own code)."""
    return (name in _HF_TOKENIZER_FILES or name == BYTE_TOKENIZER_FILE or name.startswith("tokenizer")
            or (name.startswith("tokenization_") and name.endswith(".py")))


def add_trust_remote_code_arg(p) -> None:
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let transformers run a tokenizer's own Python code (tokenizer_config.json's auto_map: "
                        "Moonlight's and Kimi K2's tiktoken tokenizers); only for tokenizers you trust")


def allow_remote_code(on: bool = True) -> None:
    """Whether HF tokenizers may run their directory's own code (``--trust-remote-code``)."""
    if on:
        os.environ[TRUST_REMOTE_CODE_ENV] = "1"
    else:
        os.environ.pop(TRUST_REMOTE_CODE_ENV, None)

# For a bare tokenizer.json (no tokenizer_config.json) the special tokens are guessed by name.
_EOS_NAMES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eos|>", "<|im_end|>",
              "<|eot_id|>", "[SEP]")
_BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>", "<|bos|>", "<|startoftext|>", "[CLS]")
_PAD_NAMES = ("<pad>", "<|pad|>", "[PAD]", "<|endoftext|>")


class TokenizerError(ValueError):
    """A tokenizer spec that cannot be loaded; the message names the path and what is missing."""


def simple_chat_template(messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
    """The built-in template: ``<|role|>\\ncontent\\n`` per message, then ``<|assistant|>\\n``."""
    parts = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) \
                or not isinstance(m.get("content"), str):
            raise ValueError(f"message {i} must be a dict with str 'role' and 'content'")
        parts.append(f"<|{m['role']}|>\n{m['content']}\n")
    if add_generation_prompt:
        parts.append("<|assistant|>\n")
    return "".join(parts)


def json_object_arg(text: str) -> dict:
    """argparse ``type`` for a JSON object flag (``--chat-template-kwargs``)."""
    import argparse

    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {type(value).__name__}")
    return value


def add_chat_template_args(p) -> None:
    """``--chat-template`` / ``--chat-template-kwargs`` / ``--system-prompt``, shared by the commands that render
    prompts (preprocess_data, evaluate, generate) so they render them the same way."""
    p.add_argument("--chat-template", action="store_true",
                   help="render each prompt as a user turn with the tokenizer's chat template (the "
                        "simple built-in one when it has none), ending with the generation prompt")
    p.add_argument("--chat-template-kwargs", type=json_object_arg, default=None, metavar="JSON",
                   help="with --chat-template: extra variables for the tokenizer's template, e.g. "
                        "'{\"enable_thinking\": false}' for Qwen3 without thinking")
    p.add_argument("--system-prompt", default=None, metavar="TEXT",
                   help="with --chat-template: a system turn before each prompt's user turn (e.g. Qwen2.5-Math's "
                        "'Please reason step by step, and put your final answer within \\boxed{}.', or its "
                        "tool-integrated instruction for --tool python)")


def chat_template_problem(args, tok: Optional["Tokenizer"]) -> Optional[str]:
    """What is wrong with --chat-template/--chat-template-kwargs/--system-prompt for ``tok``, or None."""
    if args.chat_template_kwargs is not None and not args.chat_template:
        return "--chat-template-kwargs applies to --chat-template only"
    system = getattr(args, "system_prompt", None)
    if system is not None and not args.chat_template:
        return "--system-prompt applies to --chat-template only (the system turn is rendered by the template)"
    if system is not None and tok is not None:
        try:  # some templates refuse a system turn (Gemma's), or drop it
            text = render_user_prompt(tok, "?", args.chat_template_kwargs, system)
        except Exception as e:  # noqa: BLE001
            return f"--system-prompt: tokenizer {tok.name!r}'s chat template refuses a system turn ({e})"
        if system not in text:
            return f"--system-prompt: tokenizer {tok.name!r}'s chat template drops the system turn"
    if args.chat_template and tok is None:
        return "--chat-template needs a tokenizer (--tokenizer, or a checkpoint with tokenizer/)"
    if args.chat_template_kwargs and not tok.has_chat_template:
        return (f"--chat-template-kwargs: tokenizer {tok.name!r} has no chat template of its own "
                "(the built-in simple one takes no variables)")
    return None


def render_user_prompt(tok: "Tokenizer", text: str, template_kwargs: Optional[dict] = None,
                       system: Optional[str] = None) -> str:
    """``text`` as one user turn (after a ``system`` turn when given) followed by the
    assistant's generation prompt."""
    messages = ([{"role": "system", "content": system}] if system is not None else []) + \
        [{"role": "user", "content": text}]
    return tok.apply_chat_template(messages, add_generation_prompt=True, **(template_kwargs or {}))


def encode_prompt(tok: "Tokenizer", text: str, args) -> list[int]:
    """A text prompt's ids, rendered with the chat template when ``args.chat_template``."""
    if getattr(args, "chat_template", False):
        text = render_user_prompt(tok, text, args.chat_template_kwargs, getattr(args, "system_prompt", None))
    return tok.encode(text)


class Tokenizer:
    """The common interface; see the module docstring."""

    name: str = "tokenizer"
    vocab_size: int
    eos_id: Optional[int] = None
    bos_id: Optional[int] = None
    pad_id: Optional[int] = None

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Iterable[int], keep_special: bool = False) -> str:
        """Text of ``ids``; special tokens are dropped unless ``keep_special`` (harmony's
        channel markers are special tokens a grader must see)."""
        raise NotImplementedError

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True,
                            **template_kwargs) -> str:
        return simple_chat_template(messages, add_generation_prompt)

    @property
    def has_chat_template(self) -> bool:
        """True when the tokenizer brings its own template (else the simple one is used)."""
        return False

    @property
    def special_ids(self) -> list[int]:
        return sorted({i for i in (self.bos_id, self.eos_id, self.pad_id) if i is not None})

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size}, "
                f"bos_id={self.bos_id}, eos_id={self.eos_id}, pad_id={self.pad_id})")


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255; 256 BOS, 257 EOS, 258 PAD, 259 reserved (vocab 260)."""

    BOS = 256
    EOS = 257
    PAD = 258
    RESERVED = 259
    VOCAB_SIZE = 260

    def __init__(self):
        self.name = "byte"
        self.vocab_size = self.VOCAB_SIZE
        self.bos_id = self.BOS
        self.eos_id = self.EOS
        self.pad_id = self.PAD

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int], keep_special: bool = False) -> str:
        out = bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                out.append(i)
            elif not 0 <= i < self.VOCAB_SIZE:
                raise ValueError(f"token id {i} is outside the byte vocabulary [0, {self.VOCAB_SIZE})")
            # ids 256..259 are special tokens: skipped
        return out.decode("utf-8", errors="replace")

    def to_json(self) -> dict:
        return {"type": "byte", "vocab_size": self.VOCAB_SIZE, "bos_id": self.BOS,
                "eos_id": self.EOS, "pad_id": self.PAD}


class HFTokenizer(Tokenizer):
    """An HF tokenizer: ``transformers`` (a directory with tokenizer_config.json) or a bare
    ``tokenizers.Tokenizer`` (a tokenizer.json)."""

    def __init__(self, path: str):
        self.source_path = os.path.abspath(path)
        self._hf = None  # transformers tokenizer
        self._tk = None  # tokenizers.Tokenizer
        if os.path.isdir(path):
            self.name = os.path.basename(os.path.normpath(self.source_path))
            if os.path.isfile(os.path.join(path, "tokenizer_config.json")):
                self._load_transformers(path)
            elif os.path.isfile(os.path.join(path, "tokenizer.json")):
                self._load_tokenizers(os.path.join(path, "tokenizer.json"))
            else:
                raise TokenizerError(
                    f"--tokenizer {path}: directory has neither tokenizer_config.json nor "
                    f"tokenizer.json nor {BYTE_TOKENIZER_FILE}")
        else:
            parent = os.path.dirname(self.source_path)
            self.name = os.path.basename(parent) or os.path.basename(self.source_path)
            self._load_tokenizers(path)

    # -- loading ----------------------------------------------------------------------
    def _load_transformers(self, path: str) -> None:
        try:
            from transformers import AutoTokenizer
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise TokenizerError(f"--tokenizer {path}: loading a tokenizer_config.json directory "
                                 f"needs transformers ({e})") from e
        trust = os.environ.get(TRUST_REMOTE_CODE_ENV) == "1"
        try:
            tok = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust)
        except Exception as e:  # noqa: BLE001 - report any loader failure with the path
            hint = ("; its tokenizer_config.json names code of its own (auto_map): add --trust-remote-code if you "
                    "trust it" if not trust and "trust_remote_code" in str(e) else "")
            raise TokenizerError(f"--tokenizer {path}: transformers could not load it: {e}{hint}") from e
        self._hf = tok
        self.vocab_size = int(len(tok))
        self.eos_id = tok.eos_token_id
        self.bos_id = tok.bos_token_id
        self.pad_id = tok.pad_token_id

    def _load_tokenizers(self, file: str) -> None:
        try:
            from tokenizers import Tokenizer as _TkTokenizer
        except ImportError as e:  # pragma: no cover
            raise TokenizerError(f"--tokenizer {file}: needs the 'tokenizers' package ({e})") from e
        try:
            tk = _TkTokenizer.from_file(file)
        except Exception as e:  # noqa: BLE001
            raise TokenizerError(f"--tokenizer {file}: not a readable tokenizer.json: {e}") from e
        self._tk = tk
        self.vocab_size = int(tk.get_vocab_size(with_added_tokens=True))

        def first(names):
            for n in names:
                i = tk.token_to_id(n)
                if i is not None:
                    return int(i)
            return None

        self.eos_id = first(_EOS_NAMES)
        self.bos_id = first(_BOS_NAMES)
        self.pad_id = first(_PAD_NAMES)

    # -- interface --------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        if self._hf is not None:
            return [int(i) for i in self._hf.encode(text, add_special_tokens=False)]
        return [int(i) for i in self._tk.encode(text, add_special_tokens=False).ids]

    def decode(self, ids: Iterable[int], keep_special: bool = False) -> str:
        ids = [int(i) for i in ids]
        if self._hf is not None:
            return self._hf.decode(ids, skip_special_tokens=not keep_special)
        return self._tk.decode(ids, skip_special_tokens=not keep_special)

    @property
    def has_chat_template(self) -> bool:
        return self._hf is not None and bool(getattr(self._hf, "chat_template", None))

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True,
                            **template_kwargs) -> str:
        """``template_kwargs``: extra template variables (e.g. Qwen3's ``enable_thinking``)."""
        if self.has_chat_template:
            out = self._hf.apply_chat_template(list(messages), tokenize=False,
                                               add_generation_prompt=add_generation_prompt,
                                               **template_kwargs)
            if not isinstance(out, str):  # some versions return a list for batched input
                out = out[0]
            return out
        return simple_chat_template(messages, add_generation_prompt)

    @property
    def backend(self) -> str:
        return "transformers" if self._hf is not None else "tokenizers"


# -- loading and saving ---------------------------------------------------------------
def _load_byte_json(file: str) -> Optional[ByteTokenizer]:
    """A ByteTokenizer when ``file`` is a small JSON with ``"type": "byte"``, else None."""
    try:
        if os.path.getsize(file) > 4096:
            return None
        with open(file, "r", encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, ValueError):
        return None
    if isinstance(obj, dict) and obj.get("type") == "byte":
        return ByteTokenizer()
    return None


def load_tokenizer(spec: str) -> Tokenizer:
    """A tokenizer from ``"byte"`` or a path (see the module docstring)."""
    if isinstance(spec, Tokenizer):
        return spec
    if not isinstance(spec, str) or not spec:
        raise TokenizerError(f"--tokenizer must be 'byte' or a path, got {spec!r}")
    if spec == "byte":
        return ByteTokenizer()
    path = os.path.expanduser(spec)
    if not os.path.exists(path):
        raise TokenizerError(f"--tokenizer {spec}: no such file or directory "
                             "(use 'byte' for the built-in byte tokenizer)")
    if os.path.isfile(path):
        byte = _load_byte_json(path)
        return byte if byte is not None else HFTokenizer(path)
    # a directory
    byte_file = os.path.join(path, BYTE_TOKENIZER_FILE)
    if os.path.isfile(byte_file):
        byte = _load_byte_json(byte_file)
        if byte is None:
            raise TokenizerError(f"--tokenizer {spec}: {byte_file} is not a byte tokenizer spec")
        return byte
    has_hf = any(os.path.isfile(os.path.join(path, f))
                 for f in ("tokenizer_config.json", "tokenizer.json"))
    if not has_hf and os.path.isdir(os.path.join(path, "tokenizer")):
        return load_tokenizer(os.path.join(path, "tokenizer"))
    if not has_hf:
        raise TokenizerError(
            f"--tokenizer {spec}: directory has no tokenizer_config.json, tokenizer.json, "
            f"{BYTE_TOKENIZER_FILE} or tokenizer/ sub-directory")
    if os.path.isfile(os.path.join(path, "tokenizer.json")) and \
            not os.path.isfile(os.path.join(path, "tokenizer_config.json")):
        byte = _load_byte_json(os.path.join(path, "tokenizer.json"))
        if byte is not None:
            return byte
    return HFTokenizer(path)


def save_tokenizer(tok: Tokenizer, out_dir: str) -> str:
    """Write ``tok`` into ``out_dir`` so ``load_tokenizer(out_dir)`` (or of its parent, when
    ``out_dir`` is ``<ckpt>/tokenizer``) gives it back. The byte tokenizer becomes a small
    ``byte_tokenizer.json``; HF tokenizers have their files copied verbatim (tokenizer files
    only, never model weights). Returns ``out_dir``."""
    tok = load_tokenizer(tok) if isinstance(tok, str) else tok
    os.makedirs(out_dir, exist_ok=True)
    if isinstance(tok, ByteTokenizer):
        tmp = os.path.join(out_dir, BYTE_TOKENIZER_FILE + f".tmp{os.getpid()}")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(tok.to_json(), f, indent=1)
            f.write("\n")
        os.replace(tmp, os.path.join(out_dir, BYTE_TOKENIZER_FILE))
        return out_dir
    if isinstance(tok, HFTokenizer):
        src = tok.source_path
        if os.path.isfile(src):
            shutil.copyfile(src, os.path.join(out_dir, "tokenizer.json"))
            return out_dir
        copied = 0
        for fname in sorted(os.listdir(src)):
            full = os.path.join(src, fname)
            if os.path.isfile(full) and is_tokenizer_file(fname):
                if os.path.abspath(os.path.join(out_dir, fname)) != full:
                    shutil.copyfile(full, os.path.join(out_dir, fname))
                copied += 1
        if not copied:
            raise TokenizerError(f"save_tokenizer: no tokenizer files found in {src}")
        return out_dir
    raise TokenizerError(f"save_tokenizer: cannot save a {type(tok).__name__}")
