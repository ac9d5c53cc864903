"""Our checkpoint format: per-(tp, pp)-rank model shards plus the config, written atomically.

    SAVE/
      latest_checkpointed_iteration.txt        "release" or the iteration number (updated last)
      release/ | iter_0000100/
        config.json                            {"model": GPTConfig, "tensor_model_parallel_size",
                                                "pipeline_model_parallel_size", "layer_ranges", ...}
        mp_rank_{tp:02d}_{pp:03d}/model.pt      {"model": this rank's parameters}
      tokenizer/                               (optional) copied from the HF model

A checkpoint directory is first written under a hidden temporary name and renamed when
complete, so a crash never leaves a directory that looks finished. Loading under a different
tp/pp layout cuts each parameter of the rank out of the saved shards, which are memory-mapped,
so a rank reads and holds its own part only (``models/sharding.py`` ``reshard_tensor``). Writers
take the state dict a piece at a time and write a pipeline stage's shards once its last layer
has come (``StageShardWriter``): converting a model needs the memory of one stage. Shards hold every expert of an MoE layer whatever the expert-parallel
size was; a model keeps its own experts when it loads (``parallel/expert.py``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from typing import Callable, Iterable, Iterator, Optional

import torch
import torch.distributed as dist

from megatron_k15.files import write_text_atomic
from megatron_k15.models.config import GPTConfig
from megatron_k15.models.lazy_state_dict import LazyStateDict, load_torch_file
from megatron_k15.models.sharding import (
    VOCAB_PARAMS, layer_number, merge_unpadded, pad_vocab, pipeline_layer_ranges, reshard_tensor, split_for_rank,
    split_tensor, stage_owns,
)

LATEST_FILE = "latest_checkpointed_iteration.txt"
CONFIG_FILE = "config.json"
FORMAT_VERSION = 1
HF_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json", ".msgpack", ".h5")


class CheckpointError(RuntimeError):
    pass


ITERATION_DIR = re.compile(r"iter_(\d{7,})")  # what iteration_tag names


def saved_iterations(save_dir: str, complete: bool = False) -> list[int]:
    """The iterations with an ``iter_*`` directory in ``save_dir`` (``complete``: with its
    config written, i.e. renamed from the temporary name after every part was written)."""
    names = os.listdir(save_dir) if os.path.isdir(save_dir) else []
    return sorted(int(m.group(1)) for name in names if (m := ITERATION_DIR.fullmatch(name))
                  and (not complete or os.path.isfile(os.path.join(save_dir, name, CONFIG_FILE))))


def iteration_tag(iteration: Optional[int]) -> str:
    return "release" if iteration is None else f"iter_{iteration:07d}"


def shard_dir_name(tp_rank: int, pp_rank: int) -> str:
    return f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def layout_dict(cfg: GPTConfig, tp: int, pp: int, layer_ranges: list[range], **extra) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "model": cfg.to_dict(),
        "tensor_model_parallel_size": tp,
        "pipeline_model_parallel_size": pp,
        "layer_ranges": [[r.start, r.stop] for r in layer_ranges],
        **extra,
    }


class StageShardWriter:
    """Takes our state dict in pieces that arrive in layer order (the embedding, layers, the
    final norm and head: ``hf_to_megatron_units``) and writes a pipeline stage's shards as soon
    as a later layer shows its last one has come, one tp rank's split at a time. Memory holds
    the stage being filled (a tied embedding also kept for the last stage) and one rank's part."""

    def __init__(self, ckpt_dir: str, cfg: GPTConfig, tp: int, pp: int,
                 layer_ranges: Optional[list[range]] = None, progress: Optional[Callable] = None):
        self.ckpt_dir, self.cfg, self.tp, self.pp, self.progress = ckpt_dir, cfg, tp, pp, progress
        self.ranges = layer_ranges or pipeline_layer_ranges(cfg.num_layers, pp)
        self.padded = cfg.padded_vocab_size(tp)
        self.pending: dict[int, dict[str, torch.Tensor]] = {p: {} for p in range(pp)}

    def add(self, unit: dict[str, torch.Tensor]) -> None:
        for name, tensor in unit.items():
            owners = [p for p in range(self.pp) if stage_owns(name, p, self.pp, self.ranges[p],
                                                              self.cfg.tie_word_embeddings)]
            if any(p not in self.pending for p in owners):
                raise ValueError(f"{name} came after its pipeline stage was written (pieces must come in layer "
                                 "order)")
            if name in VOCAB_PARAMS:
                tensor = pad_vocab(tensor, self.padded)  # once, also for a tied embedding's two stages
            for p in owners:
                self.pending[p][name] = tensor
        last = max((n for n in map(layer_number, unit) if n is not None), default=-1)
        for p in [p for p in self.pending if p < self.pp - 1 and last >= self.ranges[p].stop - 1]:
            self._write_stage(p)

    def _write_stage(self, p: int) -> None:
        stage = self.pending.pop(p)
        for t in range(self.tp):
            d = os.path.join(self.ckpt_dir, shard_dir_name(t, p))
            os.makedirs(d, exist_ok=True)
            shard = {name: split_tensor(tensor, name, self.tp, t) for name, tensor in stage.items()}
            torch.save({"model": shard}, os.path.join(d, "model.pt"))
            del shard
            if self.progress:
                self.progress(t, p)

    def close(self, **extra) -> None:
        """Writes the stages left and the config (with ``extra`` in its layout)."""
        for p in sorted(self.pending):
            self._write_stage(p)
        with open(os.path.join(self.ckpt_dir, CONFIG_FILE), "w") as f:
            json.dump(layout_dict(self.cfg, self.tp, self.pp, self.ranges, **extra), f, indent=2)


def write_state_dict_units(ckpt_dir: str, units: Iterable[dict[str, torch.Tensor]], cfg: GPTConfig, tp: int,
                           pp: int, layer_ranges: Optional[list[range]] = None,
                           progress: Optional[Callable] = None, **extra) -> None:
    """Shards + config from a state dict given in layer-ordered pieces (``StageShardWriter``)."""
    writer = StageShardWriter(ckpt_dir, cfg, tp, pp, layer_ranges, progress)
    for unit in units:
        writer.add(unit)
    writer.close(**extra)


def names_by_layer(names: Iterable[str]) -> list[list[str]]:
    """State-dict names grouped in the order ``StageShardWriter`` takes them: the embedding,
    each layer, then the rest (final norm, head)."""
    names = list(names)
    layers = sorted({n for n in map(layer_number, names) if n is not None})
    groups = [[n for n in names if n == "embedding.weight"]]
    groups += [[n for n in names if layer_number(n) == i] for i in layers]
    groups.append([n for n in names if layer_number(n) is None and n != "embedding.weight"])
    return [g for g in groups if g]


def write_full_state_dict(ckpt_dir: str, full: dict[str, torch.Tensor], cfg: GPTConfig, tp: int, pp: int,
                          layer_ranges: Optional[list[range]] = None, progress: Optional[Callable] = None,
                          **extra) -> None:
    """Split ``full`` for every (tp, pp) rank and write the shards + config into ``ckpt_dir``."""
    write_state_dict_units(ckpt_dir, [full], cfg, tp, pp, layer_ranges, progress, **extra)


# -- reading ----------------------------------------------------------------------------------
def resolve_checkpoint_dir(load_dir: str, flag: str = "--load", step: Optional[int] = None) -> str:
    """``--load`` may name a checkpoint root (with the latest pointer) or one iteration dir;
    ``step`` (``--ckpt-step``) picks an iteration of a root instead of the latest; errors
    name ``flag``."""
    if step is not None:
        path = os.path.join(load_dir, iteration_tag(step))
        if not os.path.isfile(os.path.join(path, CONFIG_FILE)):
            raise CheckpointError(f"{flag} {load_dir} --ckpt-step {step}: no complete checkpoint of iteration "
                                  f"{step}; complete ones: {saved_iterations(load_dir, complete=True) or 'none'}")
        return path
    if is_hf_model_dir(load_dir):
        raise CheckpointError(f"{flag} {load_dir}: a Hugging Face model directory, not one of our checkpoints; "
                              "convert it with tools/checkpoint/convert_hf_to_megatron.py (the trainers, the "
                              "generate CLI and tools/evaluate.py take it as --load as it is)")
    if os.path.isfile(os.path.join(load_dir, CONFIG_FILE)):
        return load_dir
    latest = os.path.join(load_dir, LATEST_FILE)
    if not os.path.isfile(latest):
        raise CheckpointError(f"{flag} {load_dir}: no {LATEST_FILE} and no {CONFIG_FILE} found")
    tag = open(latest).read().strip()
    if tag != "release":
        tag = iteration_tag(int(tag))
    path = os.path.join(load_dir, tag)
    if not os.path.isfile(os.path.join(path, CONFIG_FILE)):
        if _is_megatron_lm_checkpoint(path):
            raise CheckpointError(f"{flag} {load_dir}: {tag} is a Megatron-LM checkpoint, not this project's; "
                                  "export it to Hugging Face with Megatron-LM's converter, then run "
                                  "tools/checkpoint/convert_hf_to_megatron.py")
        raise CheckpointError(f"{flag} {load_dir}: {LATEST_FILE} points to {tag}, which is incomplete")
    return path


def _is_megatron_lm_checkpoint(path: str) -> bool:
    """Megatron-LM's own formats: torch_dist (a ``.metadata`` file and ``*.distcp`` shards) or
    the legacy torch one (``mp_rank_*/model_optim_rng.pt``)."""
    if not os.path.isdir(path):
        return False
    names = os.listdir(path)
    return ".metadata" in names or any(n.endswith(".distcp") for n in names) or any(
        os.path.isfile(os.path.join(path, n, "model_optim_rng.pt")) for n in names if n.startswith("mp_rank_"))


def has_checkpoint(load_dir: str) -> bool:
    """Whether ``load_dir`` is a checkpoint root with a ``latest`` pointer or one checkpoint
    (complete or not: an incomplete one is an error to report, not a fresh start)."""
    return os.path.isfile(os.path.join(load_dir, LATEST_FILE)) or os.path.isfile(os.path.join(load_dir, CONFIG_FILE))


def start_fresh_if_nothing_saved(args) -> None:
    """Megatron-LM's resume idiom: ``--load DIR --save DIR`` resumes from DIR, or starts from
    scratch while DIR holds no checkpoint yet (``args.load`` becomes None and
    ``args.load_missing`` keeps DIR, for the trainers' notice). Not with --finetune (weights are
    needed), --ckpt-step or --exit-on-missing-checkpoint; any other --load without a checkpoint
    stays an error."""
    load, save = getattr(args, "load", None), getattr(args, "save", None)
    args.load_missing = None
    if not load or not save or os.path.abspath(load) != os.path.abspath(save):
        return
    if has_checkpoint(load) or getattr(args, "finetune", False) or getattr(args, "exit_on_missing_checkpoint", False) \
            or getattr(args, "ckpt_step", None) is not None:  # a rollback needs what it rolls back to
        return
    args.load_missing, args.load = load, None


def read_layout(ckpt_dir: str) -> dict:
    with open(os.path.join(ckpt_dir, CONFIG_FILE)) as f:
        layout = json.load(f)
    if layout.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{ckpt_dir}: unsupported checkpoint format {layout.get('format_version')}")
    return layout


def is_hf_model_dir(path: str) -> bool:
    """A Hugging Face model directory (a ``config.json`` naming its architectures), which
    ``--load`` takes as it is, rather than one of our checkpoints."""
    if os.path.isfile(os.path.join(path, LATEST_FILE)):
        return False
    try:
        with open(os.path.join(path, CONFIG_FILE)) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "format_version" not in config and bool(config.get("architectures"))


def tokenizer_dir(load_dir: str) -> str:
    """Where a checkpoint keeps its tokenizer: ``tokenizer/`` under the checkpoint root, or a
    Hugging Face model directory itself when it holds tokenizer files (the path need not exist:
    callers say what is missing)."""
    from megatron_k15.data.tokenizer import is_tokenizer_file

    if is_hf_model_dir(load_dir) and any(is_tokenizer_file(n) for n in os.listdir(load_dir)):
        return load_dir
    return os.path.join(load_dir, "tokenizer")


def load_config(load_dir: str, step: Optional[int] = None) -> GPTConfig:
    """The model config of a checkpoint, or of a Hugging Face model directory."""
    if is_hf_model_dir(load_dir):
        from megatron_k15.models.config import ConfigError
        from megatron_k15.models.hf_mapping import HFCheckpointError, gpt_config_from_hf, read_hf_config

        if step is not None:
            raise CheckpointError(f"--ckpt-step {step}: {load_dir} is a Hugging Face model (one set of weights)")
        try:
            cfg = gpt_config_from_hf(read_hf_config(load_dir), os.path.join(load_dir, CONFIG_FILE))
            _check_hf_tensors(os.path.abspath(load_dir), cfg)
            return cfg
        except (HFCheckpointError, ConfigError) as e:
            raise CheckpointError(str(e)) from None
    return GPTConfig.from_dict(read_layout(resolve_checkpoint_dir(load_dir, step=step))["model"])


_CHECKED_HF_DIRS: set[tuple] = set()
HF_DIR_UNUSED_HINT = ("convert the directory with tools/checkpoint/convert_hf_to_megatron.py --ignore-unused-tensors "
                      "and load the conversion instead")


def _check_hf_tensors(hf_dir: str, cfg: GPTConfig) -> None:
    """A Hugging Face directory loaded as it is holds every tensor its conversion needs, with its
    shape, and none the model would leave out (``check_every_hf_tensor_read``: a conversion of
    the files' headers, once per process for the directory's files as they are)."""
    key = (hf_dir,) + tuple(sorted((e.name, e.stat().st_mtime_ns, e.stat().st_size)
                                   for e in os.scandir(hf_dir) if e.is_file()))
    if key in _CHECKED_HF_DIRS:
        return
    from megatron_k15.models.hf_mapping import HFCheckpointError, check_every_hf_tensor_read, read_hf_state_dict

    try:
        check_every_hf_tensor_read(read_hf_state_dict(hf_dir), cfg, hf_dir, hint=HF_DIR_UNUSED_HINT)
    except HFCheckpointError:
        raise
    except Exception as e:  # a truncated shard, a bad index, an unknown dtype: named, not a traceback
        raise HFCheckpointError(f"{hf_dir}: cannot read its weight files: {type(e).__name__}: {e}") from None
    _CHECKED_HF_DIRS.add(key)


def _shard_file(ckpt_dir: str, tp_rank: int, pp_rank: int) -> str:
    return os.path.join(ckpt_dir, shard_dir_name(tp_rank, pp_rank), "model.pt")


def read_shard(ckpt_dir: str, tp_rank: int, pp_rank: int) -> dict[str, torch.Tensor]:
    """One rank's parameters, memory-mapped (read from disk as they are used)."""
    return load_torch_file(_shard_file(ckpt_dir, tp_rank, pp_rank))["model"]


def _saved_payloads(ckpt_dir: str, layout: dict) -> dict[tuple[int, int], dict]:
    """Every rank's file of a checkpoint, memory-mapped: {(tp_rank, pp_rank): payload}."""
    tp, pp = layout["tensor_model_parallel_size"], layout["pipeline_model_parallel_size"]
    return {(t, p): load_torch_file(_shard_file(ckpt_dir, t, p)) for t in range(tp) for p in range(pp)}


def lazy_full_state_dict(load_dir: str, meta: bool = False) -> tuple[LazyStateDict, GPTConfig]:
    """The full tp=1, pp=1 state dict of a checkpoint, each tensor merged from the
    memory-mapped shards when it is read (``merge_shards`` one name at a time); ``meta``: as
    tensors on the meta device (names, shapes and dtypes; no data read)."""
    ckpt = resolve_checkpoint_dir(load_dir)
    layout = read_layout(ckpt)
    cfg = GPTConfig.from_dict(layout["model"])
    saved = {k: v["model"] for k, v in _saved_payloads(ckpt, layout).items()}
    if meta:
        saved = {k: {n: torch.empty_like(t, device="meta") for n, t in v.items()} for k, v in saved.items()}
    tp = layout["tensor_model_parallel_size"]
    loaders = {}
    for p in sorted({p for _, p in saved}):
        for name in saved[(0, p)]:
            loaders.setdefault(name, lambda name=name, p=p: merge_unpadded(
                [saved[(t, p)][name] for t in range(tp)], name, cfg.vocab_size))
    return LazyStateDict(loaders), cfg


def full_state_units(load_dir: str, meta: bool = False) -> tuple[Iterator[dict[str, torch.Tensor]], GPTConfig]:
    """Our full (tp=1, pp=1) state dict of a checkpoint or of a Hugging Face model directory,
    in layer-ordered pieces (the embedding, each layer, the rest), each read when it is reached;
    ``meta``: tensors on the meta device (names and shapes, no data read)."""
    if is_hf_model_dir(load_dir):
        from megatron_k15.models.hf_mapping import hf_to_megatron_units, read_hf_state_dict
        from megatron_k15.models.lazy_state_dict import meta_state_dict

        cfg = load_config(load_dir)
        source = read_hf_state_dict(load_dir)
        return hf_to_megatron_units(meta_state_dict(source) if meta else source, cfg, where=load_dir), cfg
    full, cfg = lazy_full_state_dict(load_dir, meta)
    return ({name: full[name] for name in names} for names in names_by_layer(full)), cfg


def copy_hf_side_files(hf_dir: str, out_dir: str) -> None:
    """A Hugging Face directory's tokenizer files to ``out_dir/tokenizer``, its other files that
    are not weights (generation_config.json, ...) to ``out_dir/hf_files`` (written back on export)."""
    from megatron_k15.data.tokenizer import is_tokenizer_file

    for name in sorted(os.listdir(hf_dir)):
        src = os.path.join(hf_dir, name)
        if not os.path.isfile(src) or name == CONFIG_FILE or name.endswith(HF_WEIGHT_SUFFIXES):
            continue
        sub = "tokenizer" if is_tokenizer_file(name) else "hf_files"
        os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
        shutil.copy2(src, os.path.join(out_dir, sub, name))


def read_full_state_dict(load_dir: str) -> tuple[dict[str, torch.Tensor], GPTConfig]:
    """All shards of a checkpoint merged into the full tp=1, pp=1 state dict."""
    lazy, cfg = lazy_full_state_dict(load_dir)
    return dict(lazy), cfg


def reshard_for_rank(saved: dict[tuple[int, int], dict[str, torch.Tensor]], cfg: GPTConfig, tp_size: int,
                     tp_rank: int, pp_size: int, pp_rank: int, layer_range: range, padded_vocab_size: int,
                     select: Optional[Callable[[str, torch.Tensor], torch.Tensor]] = None) -> dict[str, torch.Tensor]:
    """What (tp_rank, pp_rank) of a (tp_size, pp_size) layout owning ``layer_range`` holds,
    from the saved {(tp_rank, pp_rank): state} of another layout; each tensor is cut out of
    the saved shards (``reshard_tensor``), never the full model built (equal to
    ``split_for_rank(merge_shards(saved))``). ``select(name, tensor)`` narrows each saved
    piece first along a dimension tp does not split (a model's ``own_experts``: an expert-
    parallel rank copies its experts only)."""
    saved_tp = 1 + max(t for t, _ in saved)
    out = {}
    for p in sorted({p for _, p in saved}):
        for name in saved[(0, p)]:
            if name not in out and stage_owns(name, pp_rank, pp_size, layer_range, cfg.tie_word_embeddings):
                pieces = [saved[(t, p)][name] for t in range(saved_tp)]
                if select is not None:
                    pieces = [select(name, piece) for piece in pieces]
                out[name] = reshard_tensor(pieces, name, tp_size, tp_rank, cfg.vocab_size, padded_vocab_size)
    return out


def _same_layout(layout: dict, model, pp_rank: int, pp_size: int) -> bool:
    return (layout["tensor_model_parallel_size"] == model.tp_size
            and layout["pipeline_model_parallel_size"] == pp_size
            and range(*layout["layer_ranges"][pp_rank]) == model.layer_range)


def hf_state_for_rank(hf_dir: str, model, pp_rank: int, pp_size: int) -> dict[str, torch.Tensor]:
    """``model``'s part (its tp rank, pipeline stage and experts) of a Hugging Face model
    directory, converted a layer at a time from the tensors of its own layers only."""
    from megatron_k15.models.hf_mapping import hf_to_megatron_units, read_hf_state_dict

    cfg = model.config
    last = pp_rank == pp_size - 1
    units = hf_to_megatron_units(read_hf_state_dict(hf_dir), cfg, where=hf_dir, layers=model.layer_range,
                                 embedding=pp_rank == 0 or (last and cfg.tie_word_embeddings), tail=last)
    ranges = [model.layer_range if i == pp_rank else range(0) for i in range(pp_size)]
    state = {}
    for unit in units:  # experts narrowed before the tp split, so only this rank's are copied
        unit = {name: model.own_experts(name, tensor) for name, tensor in unit.items()}
        for name, part in split_for_rank(unit, model.tp_size, model.tp_rank, pp_size, pp_rank, cfg.num_layers,
                                         cfg.tie_word_embeddings, model.padded_vocab_size, ranges).items():
            if part.untyped_storage().nbytes() > part.numel() * part.element_size():
                part = part.clone()  # a view of all experts: keep this rank's only
            state[name] = part
    return state


def load_model_checkpoint(model, load_dir: str, pp_rank: int = 0, pp_size: int = 1) -> dict:
    """Load weights into ``model`` (one tp rank of one pipeline stage), resharding if the saved
    layout differs, or converting a Hugging Face model directory's own layers. Returns the
    checkpoint's layout dict (for a Hugging Face model: ``{"hf_model": dir, "iteration": None}``)."""
    if is_hf_model_dir(load_dir):
        model.load_checkpoint_state_dict(hf_state_for_rank(load_dir, model, pp_rank, pp_size))
        return {"hf_model": load_dir, "iteration": None}
    ckpt = resolve_checkpoint_dir(load_dir)
    layout = read_layout(ckpt)
    if _same_layout(layout, model, pp_rank, pp_size):
        state = read_shard(ckpt, model.tp_rank, pp_rank)
    else:
        saved = {k: v["model"] for k, v in _saved_payloads(ckpt, layout).items()}
        state = reshard_for_rank(saved, model.config, model.tp_size, model.tp_rank, pp_size, pp_rank,
                                 model.layer_range, model.padded_vocab_size, select=model.own_experts)
    model.load_checkpoint_state_dict(state)
    return layout


def _rng_state() -> dict:
    import random

    import numpy as np

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    import random

    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def prune_checkpoints(save_dir: str, iteration: int, retain_interval: int) -> list[int]:
    """``--save-retain-interval`` (Megatron-LM's): after the checkpoint of ``iteration`` is
    complete and current, delete the older ``iter_*`` checkpoints whose iteration is not a
    multiple of ``retain_interval``. Newer ones (left by another run) are not touched. Each is
    first renamed out of the ``iter_*`` namespace (``.deleting-*``, also removed if a crash
    left one), so a crash mid-delete leaves nothing that looks like a checkpoint. A deletion
    that fails (a busy file on NFS, permissions) is reported, not raised: the save succeeded.
    Returns the deleted iterations."""
    deleted = []
    for name in sorted(os.listdir(save_dir)):
        path = os.path.join(save_dir, name)
        m = ITERATION_DIR.fullmatch(name)
        try:
            if name.startswith(".deleting-"):
                shutil.rmtree(path)
            elif m is not None and int(m.group(1)) < iteration and int(m.group(1)) % retain_interval:
                doomed = os.path.join(save_dir, f".deleting-{name}-{uuid.uuid4().hex[:8]}")
                os.replace(path, doomed)
                shutil.rmtree(doomed)
                deleted.append(int(m.group(1)))
        except OSError as e:
            print(f"[checkpointing] --save-retain-interval: could not delete {path}: {e}", flush=True)
    return deleted


def save_checkpoint(save_dir: str, iteration: Optional[int], ctx, extra_state: Optional[dict] = None,
                    save_optimizer: bool = True, save_optimizer_moments: bool = True,
                    retain_interval: Optional[int] = None, save_rng: bool = True,
                    async_saver=None) -> str:
    """Save model shards, optimizer state, every rank's RNG and ``extra_state`` (iteration data
    position, sampler, replay buffer...). Collective over all ranks. ``save_optimizer_moments=
    False`` keeps the fp32 master weights and leaves out Adam's moments (for RL that resets them
    every iteration: a 7B checkpoint shrinks from ~98 to ~42 GB).

    Written into ``SAVE/.tmp-<tag>``; rank 0 renames it to ``SAVE/<tag>`` and only then
    rewrites ``latest``, so a crash at any point leaves the previous checkpoint current. Then,
    with ``retain_interval``, rank 0 deletes older checkpoints (``prune_checkpoints``).

    With an ``async_saver`` (``--async-save``, ``async_save.py``) this returns once the model
    and optimizer shard are copied to host memory; a thread writes them, and the rename
    happens in a later ``async_saver.maybe_finalize()``. Everything small (config, RNG,
    ``extra_state``) is written before returning, so it is the state of this moment."""
    model, pc = ctx.model, ctx.pc
    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    tag = iteration_tag(iteration)
    final = os.path.join(save_dir, tag)
    tmp = os.path.join(save_dir, f".tmp-{tag}")
    t0 = time.time()
    if async_saver is not None:  # the previous save must be current before this one starts
        async_saver.maybe_finalize(blocking=True)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(os.path.join(tmp, "rng"))
    if distributed:
        dist.barrier()
    opt_state = (ctx.optimizer.state_dict(moments=save_optimizer_moments)
                 if (save_optimizer and ctx.optimizer is not None) else None)
    # all E experts of every MoE layer (a collective over the ep group), so any ep loads it
    weights = model.checkpoint_state_dict(all_experts=True)
    payload = None
    if pc.writes_model_shard:
        payload = {"model": weights}
        if opt_state is not None:
            payload["optimizer"] = opt_state
    if save_rng:
        torch.save(_rng_state(), os.path.join(tmp, "rng", f"rank_{rank:05d}.pt"))
    if rank == 0:
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            json.dump(layout_dict(model.config, pc.tp_size, pc.pp_size, ctx.layer_ranges,
                                  iteration=iteration, world_size=world, cp_size=pc.cp_size,
                                  dp_size=pc.dp_size, ep_size=pc.ep_size), f, indent=2)
        torch.save(extra_state or {}, os.path.join(tmp, "trainer_state.pt"))

    def write_shard() -> None:
        if payload is not None:
            d = os.path.join(tmp, shard_dir_name(pc.tp_rank, pc.pp_rank))
            os.makedirs(d, exist_ok=True)
            # through a Python file object: its writes release the GIL, so the training thread
            # runs during an --async-save write (torch.save(obj, path) holds it in C++ throughout)
            with open(os.path.join(d, "model.pt"), "wb") as f:
                torch.save(payload, f)

    def make_current() -> None:
        if rank != 0:
            return
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        write_text_atomic(os.path.join(save_dir, LATEST_FILE), "release" if iteration is None else str(iteration))
        if retain_interval and iteration is not None:
            prune_checkpoints(save_dir, iteration, retain_interval)

    if async_saver is not None:
        from megatron_k15.async_save import snapshot_to_cpu

        if payload is not None:  # the optimizer's state_dict is a host copy already
            payload["model"] = snapshot_to_cpu(payload["model"])
        async_saver.submit(write_shard, make_current, tag, stalled_s=time.time() - t0)
        return final
    write_shard()
    if distributed:
        dist.barrier()
    make_current()
    if distributed:
        dist.barrier()
    return final


def _optimizer_state_for_rank(ckpt: str, layout: dict, model, pp_rank: int, pp_size: int) -> Optional[dict]:
    if _same_layout(layout, model, pp_rank, pp_size):
        return load_torch_file(_shard_file(ckpt, model.tp_rank, pp_rank)).get("optimizer")
    payloads = _saved_payloads(ckpt, layout)
    if any("optimizer" not in v for v in payloads.values()):
        return None
    first = payloads[(0, 0)]["optimizer"]
    out = {"step": first["step"]}
    if "loss_scaler" in first:  # fp16: the same on every rank
        out["loss_scaler"] = first["loss_scaler"]
    for key in ("exp_avg", "exp_avg_sq", "master"):
        if any(key not in v["optimizer"] for v in payloads.values()):
            continue  # saved without moments
        out[key] = reshard_for_rank({k: v["optimizer"][key] for k, v in payloads.items()}, model.config,
                                    model.tp_size, model.tp_rank, pp_size, pp_rank, model.layer_range,
                                    model.padded_vocab_size, select=model.own_experts)
    return out


def load_checkpoint(load_dir: str, ctx, finetune: bool = False, load_optimizer: bool = True,
                    load_rng: bool = True, need_optimizer_moments: bool = True,
                    step: Optional[int] = None) -> tuple[int, dict]:
    """Load into a TrainContext, resharding across tp/pp if needed. Returns (iteration,
    extra_state); with ``finetune`` only the weights are loaded and the iteration is 0. A
    checkpoint saved without Adam's moments loads them as zeros, and is refused when
    ``need_optimizer_moments`` (a run that continues its moments). ``step``: that iteration
    of ``load_dir`` rather than the latest (a rollback)."""
    model, pc = ctx.model, ctx.pc
    if is_hf_model_dir(load_dir):
        if not finetune:
            raise CheckpointError(f"--load {load_dir}: a Hugging Face model (weights, no training state); start "
                                  "from it with --finetune")
        ckpt = load_dir
    else:
        ckpt = resolve_checkpoint_dir(load_dir, step=step)
    layout = load_model_checkpoint(model, ckpt, pc.pp_rank, pc.pp_size)
    if (finetune or not load_optimizer) and ctx.optimizer is not None:
        # a fresh optimizer: fp32 master weights follow the loaded parameters, moments zero
        ctx.optimizer.load_state_dict({
            "step": 0,
            **{k: {n: (p.detach() if k == "master" else torch.zeros_like(p, dtype=torch.float32))
                   for n, p in model.named_parameters()} for k in ("exp_avg", "exp_avg_sq", "master")},
        })
    if finetune:
        return 0, {}
    if load_optimizer and ctx.optimizer is not None:
        state = _optimizer_state_for_rank(ckpt, layout, model, pc.pp_rank, pc.pp_size)
        if state is None:
            if layout.get("iteration") is None:  # converted (HF -> Megatron) or merged: weights only
                raise CheckpointError(f"--load {load_dir}: a release checkpoint (converted or merged weights, no "
                                      "training state); start from it with --finetune")
            raise CheckpointError(f"--load {load_dir}: no optimizer state (saved with --no-save-optim); add "
                                  "--no-load-optim to continue from its weights and iteration with a fresh "
                                  "optimizer, or --finetune to start from its weights at iteration 0")
        if need_optimizer_moments and not all(k in state for k in ctx.optimizer.MOMENTS):
            raise CheckpointError(f"--load {load_dir}: saved without Adam's moments by an RL run that reset the "
                                  f"optimizer every iteration, so only such a run (train_rl without "
                                  f"--keep-optimizer-state) can continue it; start from its weights with --finetune")
        ctx.optimizer.load_state_dict(state)
    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    rng_file = os.path.join(ckpt, "rng", f"rank_{rank:05d}.pt")
    if load_rng and layout.get("world_size") == world and os.path.isfile(rng_file):
        _set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=False))
    state_file = os.path.join(ckpt, "trainer_state.pt")
    extra = torch.load(state_file, map_location="cpu", weights_only=False) if os.path.isfile(state_file) else {}
    iteration = layout.get("iteration") or 0
    return int(iteration), extra


def add_checkpoint_switches(g) -> None:
    """Megatron-LM's switches for what a checkpoint holds besides the weights."""
    g.add_argument("--no-save-optim", action="store_true",
                   help="save without the optimizer state (smaller; a resume then needs --no-load-optim)")
    g.add_argument("--no-save-rng", action="store_true",
                   help="save without the RNG states (a resume is then not bit-identical)")
    g.add_argument("--no-load-optim", action="store_true",
                   help="with --load: continue from its weights and iteration with a fresh optimizer")
    g.add_argument("--no-load-rng", action="store_true", help="with --load: do not restore its RNG states")
    g.add_argument("--exit-on-missing-checkpoint", action="store_true",
                   help="with --load DIR --save DIR: stop if DIR holds no checkpoint instead of starting "
                        "from scratch")
    g.add_argument("--ckpt-step", type=int, default=None,
                   help="with --load DIR: load iteration N of DIR instead of the latest (e.g. to roll back "
                        "before a divergence; later saves then supersede the newer checkpoints)")


def check_checkpoint_switches(args) -> Optional[str]:
    for dest in ("no_load_optim", "no_load_rng", "ckpt_step"):
        if getattr(args, dest, None) not in (None, False) and not getattr(args, "load", None):
            return f"--{dest.replace('_', '-')} applies to --load DIR; add --load or drop it"
    step = getattr(args, "ckpt_step", None)
    if step is not None and step < 0:
        return f"--ckpt-step must be >= 0, got {step}"
    return None


def save_options(args) -> dict:
    """``save_checkpoint`` keywords from the command line."""
    return {"save_optimizer": not getattr(args, "no_save_optim", False),
            "save_rng": not getattr(args, "no_save_rng", False),
            "retain_interval": getattr(args, "save_retain_interval", None)}


def load_options(args) -> dict:
    """``load_checkpoint`` keywords from the command line."""
    return {"finetune": bool(getattr(args, "finetune", False)),
            "load_optimizer": not getattr(args, "no_load_optim", False),
            "load_rng": not getattr(args, "no_load_rng", False),
            "step": getattr(args, "ckpt_step", None)}
