#!/usr/bin/env python
"""Turn SFT, preference or RL-prompt JSONL into a megatron-core indexed dataset (DESIGN.md section 5).

    python tools/preprocess_data.py --mode sft --input sft.jsonl --output-prefix data/sft \\
        --tokenizer byte --chat-template --append-eos --seq-length 4096
    python tools/preprocess_data.py --mode dpo --input pairs.jsonl --output-prefix data/dpo \\
        --tokenizer byte --append-eos --seq-length 8192
    python tools/preprocess_data.py --mode prompts --input prompts.jsonl \\
        --output-prefix data/prompts --tokenizer /models/Qwen2.5-7B-Instruct --chat-template
    python tools/preprocess_data.py --mode prompts --input taco/data/train-*.parquet \\
        --output-prefix data/taco --tokenizer /models/Qwen2.5-7B-Instruct --chat-template

Outputs (see megatron_k15/data/indexed.py for the format and the readers):

- sft:     PREFIX.bin/.idx (token ids), PREFIX.loss_mask.bin/.idx (uint8 per token: 0 on
           prompt/template tokens, 1 on response tokens), PREFIX.json (summary)
- dpo:     the same files with two sequences per pair, interleaved: prompt + chosen, then
           prompt + rejected, each tokenized and masked like an SFT {"prompt", "response"}
           line (megatron_k15/data/preference.py reads them)
- prompts: PREFIX.bin/.idx (prompt token ids), PREFIX.meta.jsonl (each sample's validated
           record: id, prompt, task, answer/tests, difficulty, ...), PREFIX.json (summary)

SFT lines are {"prompt", "response"} or {"messages": [{"role", "content"}, ...]}; ShareGPT's
{"conversations": [{"from": "human"|"gpt"|"system"|..., "value"}, ...]} is read as "messages"
and Alpaca's {"instruction", "input", "output"} as a pair (prompt = instruction, a blank line,
input). The input may also be one JSON array of records (as alpaca_data.json is); errors then
give the line each record starts on. A Parquet file (Hugging Face datasets' format; needs
pyarrow) is read row by row, errors naming the row. Prompt lines may also be GSM8K, MATH,
APPS / TACO or CodeContests records, read as prompt records (megatron_k15/data/public_formats.py).
Without --chat-template a prompt/response pair is tokenized as the prompt text followed by
the response text; "messages" lines are always rendered with a chat template (the
tokenizer's with --chat-template, else the simple built-in one: "<|role|>\\ncontent\\n" per
message). Each turn is tokenized as its own segment so the loss mask is exact: the
assistant's content (and what the template puts after it in that turn) is 1, the rest 0.
Messages after the last assistant message are dropped. --append-eos adds the tokenizer's
EOS (mask 1) at the end of each SFT sample. A conversation whose template rewrites the history
(Qwen3 drops the reasoning of earlier assistant turns, so the rendered conversation is not
what the model saw when it wrote a turn) becomes one sample per assistant turn, each with its
history rendered as at inference (--multi-turn auto; `joint` refuses such lines, `per-turn`
splits every conversation); the summary counts the split conversations.

Preference lines (dpo) are {"prompt", "chosen", "rejected"} (an optional "id"; what
tools/build_long2short_data.py --mode dpo writes). --seq-length bounds a pair: both sequences
together (train_sft --loss dpo packs a pair into one row, so the same --seq-length fits every
pair); longer pairs are dropped, never truncated.

With --chat-template in prompts mode a prompt is rendered as one user turn followed by the
generation prompt (the assistant header). --chat-template-kwargs '{"enable_thinking": false}'
passes variables to the tokenizer's template (Qwen3 then renders an empty reasoning block).

Everything is written under temporary names and renamed at the end (PREFIX.json last), so
after a failure none of the final names exists. A bad line (invalid JSON, not UTF-8,
missing or mistyped field, math without answer, malformed code tests, duplicate id) stops
the run with exit code 1 and "FILE:LINE: field 'NAME': ..." on stderr; --skip-bad-lines
skips and counts such lines instead (printed, and recorded in PREFIX.json).
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import sys
import time
from typing import Iterator, Optional

if importlib.util.find_spec("megatron_k15") is None:  # run from a checkout: tools/ sits next to it
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_k15.data.indexed import (  # noqa: E402
    LOSS_MASK_SUFFIX,
    META_SUFFIX,
    SUMMARY_SUFFIX,
    IndexedDatasetWriter,
    token_dtype,
)
from megatron_k15.data.preference import validate_preference_record  # noqa: E402
from megatron_k15.data.prompts import (  # noqa: E402
    DataError,
    DuplicateIdChecker,
    FieldError,
    input_size,
    iter_raw_lines,
    parse_json_line,
    validate_prompt_record,
    validate_sft_record,
)
from megatron_k15.data.tokenizer import (  # noqa: E402
    TokenizerError,
    add_chat_template_args,
    add_trust_remote_code_arg,
    allow_remote_code,
    chat_template_problem,
    load_tokenizer,
    render_user_prompt,
    simple_chat_template,
)

SUMMARY_FORMAT = "megatron_k15.preprocess_data"
SUMMARY_VERSION = 2  # 2: "input" is the list of input files
_MAX_REPORTED = 20  # bad lines printed / kept in the summary
_CHUNK_LINES = 256


class PreprocessError(RuntimeError):
    """A problem with the options or the input as a whole (not a single line)."""


# -- argument parsing ---------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="preprocess_data.py",
        description="Tokenize SFT or RL-prompt JSONL into a megatron-core indexed dataset "
                    "(PREFIX.bin/.idx) with a loss mask (sft) or a metadata sidecar (prompts).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 2)[2] if __doc__ else None,
    )
    p.add_argument("--mode", choices=("sft", "dpo", "prompts"), required=True,
                   help="sft: {prompt,response} or {messages} lines; dpo: {prompt,chosen,rejected} "
                        "preference pairs; prompts: RL prompt records")
    p.add_argument("--input", required=True, nargs="+", metavar="FILE",
                   help="input JSONL file(s), files holding one JSON array of records, or Parquet files "
                        "(e.g. a Hugging Face dataset's shards); several are read one after the other "
                        "into one dataset")
    p.add_argument("--output-prefix", required=True, metavar="PREFIX",
                   help="write PREFIX.bin, PREFIX.idx, ... (directories are created)")
    p.add_argument("--tokenizer", required=True, metavar="PATH|byte",
                   help="'byte' (built-in) or an HF tokenizer directory / tokenizer.json")
    add_trust_remote_code_arg(p)
    add_chat_template_args(p)
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="tokenizer processes (default 1); the output does not depend on N")
    p.add_argument("--skip-bad-lines", action="store_true",
                   help="skip and count bad lines instead of stopping at the first one")
    p.add_argument("--seq-length", type=int, default=None, metavar="N",
                   help="maximum tokens per sample; longer samples are handled by --overlong "
                        "(prompts mode: longer prompts are dropped; dpo: maximum tokens of a pair, "
                        "both sequences together, longer pairs are dropped); counts are reported")
    p.add_argument("--overlong", choices=("drop", "truncate"), default="drop",
                   help="sft: drop over-long samples (default) or truncate them to "
                        "--seq-length (a sample left without response tokens is dropped)")
    p.add_argument("--multi-turn", choices=("auto", "joint", "per-turn"), default="auto",
                   help="sft conversations with several assistant turns: joint = one sample, "
                        "loss on every assistant turn (needs a template that renders each turn "
                        "as a continuation of the earlier ones); per-turn = one sample per "
                        "assistant turn, its history rendered as at inference (Qwen3's template "
                        "drops earlier reasoning); auto (default) = joint where the template "
                        "allows, per-turn where it rewrites the history")
    p.add_argument("--append-eos", action="store_true",
                   help="sft/dpo: append the tokenizer's EOS token (trained on) to every sample")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (it is also off when stderr is not a terminal)")
    return p


def _check_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    if args.seq_length is not None and args.seq_length < 1:
        parser.error(f"--seq-length must be >= 1, got {args.seq_length}")
    if args.mode == "prompts":
        if args.append_eos:
            parser.error("--append-eos applies to --mode sft only (a prompt must end where "
                         "generation starts)")
        if args.overlong == "truncate":
            parser.error("--overlong truncate applies to --mode sft only (prompts are never "
                         "truncated; over-long ones are dropped)")
    if args.mode != "sft" and args.multi_turn != "auto":
        parser.error(f"--multi-turn {args.multi_turn} applies to --mode sft only")
    if args.mode == "dpo" and args.overlong == "truncate":
        parser.error("--overlong truncate applies to --mode sft only (a truncated response would "
                     "change the sequence log-prob DPO compares; over-long pairs are dropped)")


# -- per-line work (runs in the worker processes) ---------------------------------------------
_STATE: dict = {}


def _init_worker(tokenizer, opts: dict) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _STATE["tok"] = load_tokenizer(tokenizer)
    _STATE["opts"] = opts


def _render(messages, tok, opts: dict, add_generation_prompt: bool) -> str:
    try:
        if opts["chat_template"]:
            return tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                           **opts["chat_template_kwargs"])
        return simple_chat_template(messages, add_generation_prompt)
    except Exception as e:  # noqa: BLE001 - a template failure is this record's problem
        raise FieldError("messages", f"the chat template failed: {e}") from None


def _assistant_turns(msgs: list, tok, opts: dict) -> list[tuple[int, str, str]]:
    """(index, head, full) per assistant message: the template's rendering of the conversation
    before it, with the generation prompt (what the model sees when it writes the turn), and
    with the turn itself. The turn's tokens are ``full[len(head):]``."""
    turns = []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        head = _render(msgs[:i], tok, opts, True)
        full = _render(msgs[:i + 1], tok, opts, False)
        if not full.startswith(head):
            raise FieldError(f"messages[{i}]",
                             "the chat template does not render this turn after its generation "
                             "prompt, so the response tokens cannot be masked")
        turns.append((i, head, full))
    return turns


def _sft_samples(rec: dict, tok, opts: dict) -> tuple[list[list[tuple[str, int]]], bool]:
    """The samples of one SFT record, each as (text, is_response) segments whose concatenation
    is the rendered sample; and whether a conversation was split into one sample per turn.

    One conversation is one sample when the template renders each turn as a continuation of
    the earlier ones. Templates that rewrite the history (Qwen3 drops the reasoning of earlier
    assistant turns) do not; then each assistant turn is its own sample, its context rendered
    exactly as at inference (``--multi-turn auto``, the default, or ``per-turn``)."""
    msgs = rec["messages"]
    if rec.get("pair") and not opts["chat_template"]:
        return [[(msgs[0]["content"], 0), (msgs[1]["content"], 1)]], False
    turns = _assistant_turns(msgs, tok, opts)
    broken = [i for (i, head, _), (_, _, prev) in zip(turns[1:], turns[:-1])
              if not head.startswith(prev)]
    mode = opts.get("multi_turn", "auto")
    if mode == "per-turn" or (broken and mode == "auto"):
        return [[(head, 0), (full[len(head):], 1)] for _, head, full in turns], len(turns) > 1
    if broken:
        raise FieldError(f"messages[{broken[0]}]",
                         "the chat template does not render this turn as a continuation of the "
                         "earlier ones (it rewrites the history), so the conversation is not one "
                         "sample; --multi-turn auto or per-turn trains each assistant turn as its "
                         "own sample")
    segs: list[tuple[str, int]] = []
    done = ""
    for _, head, full in turns:
        segs += [(head[len(done):], 0), (full[len(head):], 1)]
        done = full
    return [segs], False


def _tokenize_sample(segments: list[tuple[str, int]], tok, opts: dict, field: str):
    ids: list[int] = []
    mask: list[int] = []
    for text, is_resp in segments:
        if text:
            t = tok.encode(text)
            ids.extend(t)
            mask.extend([is_resp] * len(t))
    if opts["append_eos"]:
        ids.append(tok.eos_id)
        mask.append(1)
    if not any(mask):
        raise FieldError(field, "the response tokenizes to no tokens (nothing to train on)")
    return ids, mask


def _tokenize_sft(rec: dict, tok, opts: dict, field: str):
    """([(ids, loss mask)] per sample, split into turns?)"""
    samples, split = _sft_samples(rec, tok, opts)
    return [_tokenize_sample(segs, tok, opts, field) for segs in samples], split


def _process_sft(obj: dict, tok, opts: dict):
    rec = validate_sft_record(obj)
    return _tokenize_sft(rec, tok, opts, "response" if rec.get("pair") else "messages")


def _process_dpo(obj: dict, tok, opts: dict):
    """((chosen ids, mask), (rejected ids, mask)), each as an SFT prompt/response pair."""
    rec = validate_preference_record(obj)
    out = []
    for field in ("chosen", "rejected"):
        pair = {"messages": [{"role": "user", "content": rec["prompt"]},
                             {"role": "assistant", "content": rec[field]}], "pair": True}
        (sample,), _ = _tokenize_sft(pair, tok, opts, field)
        out.append(sample)
    return tuple(out)


def _process_prompt(obj: dict, tok, opts: dict, path: str, lineno: int):
    rec = validate_prompt_record(obj, default_id=f"{opts['labels'][path]}:{lineno}")
    text = rec["prompt"]
    if opts["chat_template"]:
        try:
            text = render_user_prompt(tok, text, opts["chat_template_kwargs"], opts.get("system_prompt"))
        except Exception as e:  # noqa: BLE001 - a template failure is this record's problem
            raise FieldError("prompt", f"the chat template failed: {e}") from None
    ids = tok.encode(text)
    if not ids:
        raise FieldError("prompt", "tokenizes to no tokens")
    return ids, rec


def _process_chunk(item: tuple[str, list[tuple[int, bytes]]]):
    """One chunk of one input file: [(lineno, kind, payload)], kind "ok" | "bad" | "blank";
    plus the chunk's byte size and the file."""
    path, chunk = item
    tok, opts = _STATE["tok"], _STATE["opts"]
    out = []
    nbytes = 0
    for lineno, raw in chunk:
        nbytes += len(raw) + 1
        try:
            obj = parse_json_line(path, lineno, raw)
            if obj is None:
                out.append((lineno, "blank", None))
                continue
            try:
                if opts["mode"] == "sft":
                    payload = _process_sft(obj, tok, opts)
                elif opts["mode"] == "dpo":
                    payload = _process_dpo(obj, tok, opts)
                else:
                    payload = _process_prompt(obj, tok, opts, path, lineno)
            except FieldError as e:
                raise DataError(path, lineno, e.field, e.msg) from None
            out.append((lineno, "ok", payload))
        except DataError as e:
            out.append((lineno, "bad", e))
    return out, nbytes, path


def input_labels(paths: list[str]) -> dict[str, str]:
    """The name each input's default ids (``NAME:LINE``) use: its file name, or, when inputs
    share one (a dataset's shards in folders of their own), its path from their common folder."""
    names = [os.path.basename(p) for p in paths]
    if len(set(names)) == len(names):
        return dict(zip(paths, names))
    common = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])
    return {p: os.path.relpath(os.path.abspath(p), common) for p in paths}


def _chunks(paths: list[str], labels: dict[str, str]) -> Iterator[tuple[str, list[tuple[int, bytes]]]]:
    """(file, lines) chunks of each input file in turn (a chunk never spans two files)."""
    for path in paths:
        it = iter_raw_lines(path, labels[path])
        while True:
            chunk = list(itertools.islice(it, _CHUNK_LINES))
            if not chunk:
                break
            yield path, chunk


# -- output files ------------------------------------------------------------------------
class _Outputs:
    """Temporary files for one run, renamed to their final names by commit()."""

    def __init__(self, prefix: str, mode: str, dtype):
        self.prefix = prefix
        self.tag = f".tmp-{os.getpid()}"
        self.final: list[tuple[str, str]] = []  # (tmp, final), summary last
        self.writers: list[IndexedDatasetWriter] = []
        self.meta = None

        def writer(pfx: str, dt) -> IndexedDatasetWriter:
            w = IndexedDatasetWriter(pfx + ".bin" + self.tag, pfx + ".idx" + self.tag, dt)
            self.writers.append(w)
            self.final += [(w.bin_path, pfx + ".bin"), (w.idx_path, pfx + ".idx")]
            return w

        try:
            self.tokens = writer(prefix, dtype)
            self.mask = writer(prefix + LOSS_MASK_SUFFIX, "uint8") if mode in ("sft", "dpo") else None
            if mode == "prompts":
                meta_path = prefix + META_SUFFIX
                self.meta = open(meta_path + self.tag, "w", encoding="utf-8")
                self.final.append((meta_path + self.tag, meta_path))
        except BaseException:
            self.abort()
            raise
        self.summary_path = prefix + SUMMARY_SUFFIX
        self.final.append((self.summary_path + self.tag, self.summary_path))

    def commit(self, summary: dict) -> None:
        for w in self.writers:
            w.finalize()
        if self.meta is not None:
            self.meta.close()
        with open(self.summary_path + self.tag, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=1, sort_keys=True)
            f.write("\n")
        moved = []
        try:
            for tmp, final in self.final:
                os.replace(tmp, final)
                moved.append(final)
        except BaseException:
            for final in moved:
                _remove(final)
            raise

    def abort(self) -> None:
        for w in self.writers:
            w.abort()
        if self.meta is not None:
            self.meta.close()
        for tmp, _ in self.final:
            _remove(tmp)


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


# -- the run -------------------------------------------------------------------------------
def _progress(total: int, unit: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit=unit, unit_scale=True, desc="preprocess", file=sys.stderr,
                dynamic_ncols=True)


def _log(msg: str, bar) -> None:
    if bar is not None:
        bar.write(msg, file=sys.stderr)
    else:
        print(msg, file=sys.stderr)


def run(args: argparse.Namespace) -> dict:
    """Preprocess per ``args`` (the parsed CLI); returns the summary. Raises DataError for a
    bad line, TokenizerError / PreprocessError for bad options; no output files then."""
    paths = list(args.input)
    for path in paths:
        if not os.path.isfile(path):
            raise PreprocessError(f"--input {path}: no such file")
    if len(set(map(os.path.realpath, paths))) < len(paths):
        raise PreprocessError("--input names a file twice")
    tok = load_tokenizer(args.tokenizer)
    if args.mode in ("sft", "dpo") and args.append_eos and tok.eos_id is None:
        raise PreprocessError(f"--append-eos: tokenizer {tok.name!r} has no EOS token")
    problem = chat_template_problem(args, tok)
    if args.system_prompt is not None and args.mode != "prompts":
        problem = (f"--system-prompt applies to --mode prompts; for --mode {args.mode} give the records as "
                   "'messages' with a system turn" if args.mode == "sft" else
                   f"--system-prompt applies to --mode prompts, not --mode {args.mode}")
    if problem:
        raise PreprocessError(problem)
    opts = {"mode": args.mode, "chat_template": bool(args.chat_template),
            "chat_template_kwargs": dict(args.chat_template_kwargs or {}), "system_prompt": args.system_prompt,
            "append_eos": bool(args.append_eos), "multi_turn": args.multi_turn, "labels": input_labels(paths)}
    dtype = token_dtype(tok.vocab_size)

    out_dir = os.path.dirname(os.path.abspath(args.output_prefix))
    made_dir = None
    if not os.path.isdir(out_dir):
        made_dir = out_dir
        os.makedirs(out_dir)

    outputs = None
    pool = None
    bar = None
    stats = {"lines": 0, "bad": 0, "truncated": 0, "dropped_overlong": 0, "samples": 0,
             "tokens": 0, "loss_tokens": 0, "split_conversations": 0}
    bad_lines: list[str] = []
    ids_seen = DuplicateIdChecker()
    show = not getattr(args, "no_progress", False) and sys.stderr.isatty()
    try:
        outputs = _Outputs(args.output_prefix, args.mode, dtype)
        sizes = [input_size(path) for path in paths]  # bytes of a file; rows of a Parquet file
        unit = sizes[0][1] if len({u for _, u in sizes}) == 1 else "file"  # mixed: files done
        bar = _progress(sum(n for n, _ in sizes) if unit != "file" else len(paths), unit, show)
        if args.workers > 1:
            import multiprocessing as mp

            methods = mp.get_all_start_methods()
            ctx = mp.get_context("fork" if "fork" in methods else "spawn")
            pool = ctx.Pool(args.workers, initializer=_init_worker, initargs=(args.tokenizer, opts))
            results = pool.imap(_process_chunk, _chunks(paths, opts["labels"]), chunksize=1)
        else:
            _STATE["tok"], _STATE["opts"] = tok, opts
            results = map(_process_chunk, _chunks(paths, opts["labels"]))

        last_line = {p: 0 for p in paths}  # per file: the last line seen, and its records
        lines = {p: 0 for p in paths}
        file_done = 0
        for chunk_result, nbytes, path in results:
            while unit == "file" and paths[file_done] != path:  # the files before this one are done
                file_done += 1
                if bar is not None:
                    bar.update(1)
            for lineno, kind, payload in chunk_result:
                last_line[path] = lineno
                if kind == "blank":
                    continue
                stats["lines"] += 1
                lines[path] += 1
                if kind == "ok" and args.mode == "prompts":
                    try:
                        ids_seen.check(path, lineno, payload[1]["id"])
                    except DataError as e:
                        kind, payload = "bad", e
                if kind == "bad":
                    if not args.skip_bad_lines:
                        raise payload
                    stats["bad"] += 1
                    if len(bad_lines) < _MAX_REPORTED:
                        bad_lines.append(str(payload))
                        _log(f"warning: skipped {payload}", bar)
                    continue
                if args.mode == "dpo":
                    (ids_c, mask_c), (ids_r, mask_r) = payload
                    if args.seq_length is not None and len(ids_c) + len(ids_r) > args.seq_length:
                        stats["dropped_overlong"] += 1
                        continue
                    for ids, msk in ((ids_c, mask_c), (ids_r, mask_r)):
                        outputs.tokens.add(ids)
                        outputs.mask.add(msk)
                        stats["tokens"] += len(ids)
                        stats["loss_tokens"] += int(sum(msk))
                    stats["samples"] += 1
                    continue
                if args.mode == "sft":
                    samples, split = payload
                else:
                    samples, split = [payload], False
                written = 0
                for ids, extra in samples:
                    if args.seq_length is not None and len(ids) > args.seq_length:
                        if args.mode == "sft" and args.overlong == "truncate" \
                                and any(extra[:args.seq_length]):
                            ids, extra = ids[:args.seq_length], extra[:args.seq_length]
                            stats["truncated"] += 1
                        else:
                            stats["dropped_overlong"] += 1
                            continue
                    outputs.tokens.add(ids)
                    written += 1
                    stats["samples"] += 1
                    stats["tokens"] += len(ids)
                    if args.mode == "sft":
                        outputs.mask.add(extra)
                        stats["loss_tokens"] += int(sum(extra))
                    else:
                        outputs.meta.write(json.dumps(extra, ensure_ascii=False) + "\n")
                stats["split_conversations"] += int(split and written > 0)
            if bar is not None and unit != "file":  # a JSON array's elements are re-encoded: sizes estimate
                bar.update(len(chunk_result) if unit == "rows" else min(nbytes, bar.total - bar.n))
        if bar is not None:
            bar.update(bar.total - bar.n)
        for path in paths:
            if lines[path] == 0:
                raise DataError(path, max(1, last_line[path]), None, "file is empty (no records)")
        if stats["samples"] == 0:
            raise PreprocessError(
                f"{', '.join(paths)}: no samples left ({stats['bad']} bad lines skipped, "
                f"{stats['dropped_overlong']} over-long dropped); nothing written")

        summary = {
            "format": SUMMARY_FORMAT,
            "version": SUMMARY_VERSION,
            "mode": args.mode,
            "input": [os.path.abspath(path) for path in paths],
            "tokenizer": args.tokenizer,
            "tokenizer_name": tok.name,
            "vocab_size": tok.vocab_size,
            "bos_id": tok.bos_id,
            "eos_id": tok.eos_id,
            "pad_id": tok.pad_id,
            "dtype": str(dtype),
            "chat_template": bool(args.chat_template),
            "chat_template_kwargs": args.chat_template_kwargs,
            "system_prompt": args.system_prompt,
            "append_eos": bool(args.append_eos),
            "seq_length": args.seq_length,
            "overlong": args.overlong if args.seq_length is not None else None,
            "lines": stats["lines"],
            "num_samples": stats["samples"],
            "num_tokens": stats["tokens"],
            "skipped_bad_lines": stats["bad"],
            "bad_lines": bad_lines,
            "truncated": stats["truncated"],
            "dropped_overlong": stats["dropped_overlong"],
        }
        if args.mode in ("sft", "dpo"):
            summary["num_loss_tokens"] = stats["loss_tokens"]
        if args.mode == "sft":
            summary["multi_turn"] = args.multi_turn
            summary["split_conversations"] = stats["split_conversations"]
        if args.mode == "dpo":
            summary["num_sequences"] = 2 * stats["samples"]  # prompt+chosen, prompt+rejected
        outputs.commit(summary)
        outputs = None
        return summary
    finally:
        if bar is not None:
            bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
        if outputs is not None:
            outputs.abort()
            if made_dir is not None:
                try:
                    os.rmdir(made_dir)
                except OSError:
                    pass


def main(argv: Optional[list] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(args, parser)
    allow_remote_code(args.trust_remote_code)
    t0 = time.time()
    try:
        summary = run(args)
    except (DataError, TokenizerError, PreprocessError) as e:
        msg = str(e)
        if isinstance(e, DataError) and e.line is not None and not args.skip_bad_lines \
                and not e.msg.startswith("file is empty"):
            msg += " (use --skip-bad-lines to skip and count bad lines)"
        print(f"error: {msg}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; no output written", file=sys.stderr)
        return 130
    dt = time.time() - t0
    parts = [f"{summary['num_samples']} {'pairs' if args.mode == 'dpo' else 'samples'}",
             f"{summary['num_tokens']} tokens"]
    if args.mode in ("sft", "dpo"):
        parts.append(f"{summary['num_loss_tokens']} loss tokens")
    parts.append(f"{summary['skipped_bad_lines']} bad lines skipped")
    if args.seq_length is not None:
        parts.append(f"{summary['truncated']} truncated, {summary['dropped_overlong']} over-long dropped")
    print(f"wrote {args.output_prefix}.* ({args.mode}): " + ", ".join(parts) + f" in {dt:.1f}s",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
