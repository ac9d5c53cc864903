"""The generation engine: KV-cached decoding with continuous batching on the training model.

The model that trains also generates (no weight copy). Per step the engine either

- **prefills** newly admitted requests: their tokens packed in one row, varlen attention
  (the model's attention backend: our Triton flash kernels on GPU), K/V written to the paged
  cache; requests with identical token lists (the k samples of one prompt) are prefilled
  once and forked, sharing the prompt's full blocks; or
- **decodes** one token for every running request with the split-KV paged decode kernel.

Continuous batching: a finished request frees its blocks at once and waiting requests are
admitted before the next step while blocks (and ``max_batch_size``) allow. When a running
request needs a block and none is free, the most recently admitted request is preempted: its
blocks are freed and it goes back to the front of the queue with the tokens it has, to be
re-prefilled later (recompute preemption; its random generator carries on, so what it
samples does not depend on the preemption).

Every tp (and pp, cp) rank runs the same scheduler on the same tokens: the tp ranks of the
last pipeline stage sample vocabulary-parallel (``sampling.sample_tokens_vocab_parallel``:
the full-vocabulary logits are never gathered, and every tp rank gets the same tokens), and
the tokens go from there to the other stages (and from cp rank 0 to the other cp ranks), so
all ranks take the same decisions in the same order. Under pipeline parallelism each stage runs its own layers on its own cache
and passes the hidden states to the next stage, and the running requests are split into
``num_lanes`` (default pp) lanes, decode microbatches that take turns: while stage 1 runs
lane 0's step, stage 0 already runs lane 1's, and lane 0's sampled tokens travel back from
the last stage (point to point, not waited for) before the first stage needs them again.
A lane applies its previous step's tokens at the start of its next turn, on every rank, so
admissions, preemptions and frees happen at the same logical point everywhere. With pp
stages and pp lanes no stage waits in the steady state: a decode step of the whole batch
takes one stage's time instead of pp stages' (`bench/generation.py --pp`).

Context-parallel decode (``cp_group``): the KV cache of every sequence is sharded over the cp
ranks by position (rank r keeps the K/V of positions p with p % cp == r), so a rollout of
L tokens needs L / cp cache slots per rank. Every cp rank runs the layers on the same tokens;
prefill attends over the whole prompt locally (it has all of its K/V in that forward), and
decode attends over the local shard with the split-KV kernel, returning its LSE, and merges
the cp partial outputs in fp32: out = sum_r exp(lse_r - m) out_r / sum_r exp(lse_r - m).
Scheduling uses the smallest free-block count over the cp ranks, so they decide alike.

Expert parallelism (the model's ``ep_group``): every MoE layer call is a collective over the
ep group, whose ranks generate different requests and finish at different times. Before each
forward a rank says over the group that it has one (one small all-reduce); a rank whose
requests are all done keeps answering and runs ``model.serve_experts()`` (its MoE layers
exchange with no tokens of its own) for every forward another rank still has, until none has.

``generate`` has the signature of ``generation.recompute.generate_recompute`` (the O(n^2)
reference the tests compare against) and returns the same ``GenerationResult``s.
"""

from __future__ import annotations

import math
import time
import warnings
import zlib
from collections import deque
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_k15.generation.inference_batch import InferenceBatch
from megatron_k15.generation.kv_cache import OutOfBlocks, PagedKVCache, blocks_for_memory, page_layout
from megatron_k15.generation.recompute import GenerationResult, generate_recompute
from megatron_k15.generation.sampling import SamplingParams, sample_tokens_vocab_parallel
from megatron_k15.initialize import pipeline_token_group
from megatron_k15.kernels.decode_attention import HAVE_TRITON
from megatron_k15.models.attention import get_attention_backend
from megatron_k15.profiling import phase


@dataclass
class _Request:
    index: int
    tokens: list[int]  # prompt + generated so far; all but the last are in the cache while running
    budget: int
    generator: Optional[torch.Generator]
    detector: object
    result: GenerationResult


@dataclass
class EngineStats:
    prefill_tokens: int = 0  # prompt (and re-prefilled) tokens run through the model
    generated_tokens: int = 0  # tokens sampled
    steps: int = 0  # lane turns that ran a forward (prefill or decode of one lane)
    preemptions: int = 0
    seconds: float = 0.0
    peak_cache_bytes: int = 0  # most KV-cache memory sequences held at once (blocks in use x their size)

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens per second of ``generate`` wall time (prefill included)."""
        return self.generated_tokens / self.seconds if self.seconds > 0 else 0.0


class GenerationEngine:
    """KV-cached generation for a ``models.gpt.GPTModel`` (any tp size; pp via ``pp_group``).

    Args:
        model: the model (this rank's tp shard / pp stage). Generation runs under ``eval()``.
        block_size: tokens per KV-cache block.
        num_blocks: cache size; default: on GPU ``kv_memory_fraction`` of the free memory,
            on CPU enough for the requests of each call (grown as needed).
        max_batch_size: most requests decoded together.
        max_prefill_tokens: most tokens prefilled in one forward; a longer prompt is prefilled
            in chunks of this size over its cached prefix.
        pp_group: the pipeline group when the model is one stage of several.
        cp_group: shard every sequence's KV cache over this group (context-parallel decode);
            all its ranks must be given the same requests.
        decode_impl: ``paged_decode_attention``'s ``impl``; auto: the Triton kernel on GPU, its
            PyTorch version on CPU (where Triton would only interpret).
        num_lanes: the running requests are split into this many lanes that take turns (decode
            microbatches); default: the number of pipeline stages, which keeps every stage busy.
        window_cache: sliding-window layers keep only their window's blocks (``PagedKVCache``
            with ``layer_windows``); False keeps every token of every layer (as before, and
            for comparison). Not under cp decode, which refuses windows.
        latent_cache: a multi-latent-attention model caches each token's latent (kv_lora_rank +
            qk_pos_emb_head_dim values per layer, ``PagedKVCache(keys_only=True)``) and decodes
            with queries absorbed into it; False caches every head's K and V (2 x heads x
            head_dim values), as other models do.
    """

    def __init__(self, model, *, block_size: int = 16, num_blocks: Optional[int] = None,
                 max_batch_size: int = 256, max_prefill_tokens: int = 16384,
                 kv_memory_fraction: float = 0.5, pp_group=None, cp_group=None,
                 decode_impl: str = "auto", num_lanes: Optional[int] = None,
                 window_cache: bool = True, latent_cache: bool = True):
        if max_batch_size < 1 or max_prefill_tokens < 1 or block_size < 1:
            raise ValueError("max_batch_size, max_prefill_tokens and block_size must be >= 1")
        if num_lanes is not None and num_lanes < 1:
            raise ValueError(f"num_lanes must be >= 1, got {num_lanes}")
        self.model = model
        self.block_size = block_size
        self.fixed_num_blocks = num_blocks
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.kv_memory_fraction = kv_memory_fraction
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        if decode_impl == "auto":
            decode_impl = "triton" if self.device.type == "cuda" and HAVE_TRITON else "torch"
        self.decode_impl = decode_impl
        self.prefill_attention = get_attention_backend(model.local_attention_backend, model.config.head_dim)
        self.pp_group = pp_group
        self.pp_size = 1 if pp_group is None else dist.get_world_size(pp_group)
        self.pp_rank = 0 if pp_group is None else dist.get_rank(pp_group)
        self.cp_size = 1 if cp_group is None else dist.get_world_size(cp_group)
        self.cp_rank = 0 if cp_group is None else dist.get_rank(cp_group)
        self.cp_group = cp_group if self.cp_size > 1 else None
        self.num_lanes = num_lanes or self.pp_size
        # tokens travel back on their own communicator (initialize.py creates one per
        # pipeline group), not behind the forward hidden-state traffic
        self._token_group = pipeline_token_group(pp_group) if self.pp_size > 1 else None
        self._sends: deque = deque()  # (work, tensor) of point-to-point sends in flight
        self.cache: Optional[PagedKVCache] = None
        self.stats = EngineStats()
        self._on_finish = None
        cfg = model.config
        # (kv heads, values per head, keys only) of a cache row
        self._kv_heads, self._head_dim, self.latent_cache = cfg.kv_cache_row(model.tp_size, latent_cache)
        self._num_layers = len(model.layers)
        windows = [layer.self_attention.window_size[0] for layer in model.layers.values()]
        self._layer_windows = windows if window_cache and self.cp_group is None and max(windows, default=-1) >= 0 \
            else None
        self._layout_agreed = self.pp_size == 1
        self._pad_to = model.tp_size if model.sequence_parallel else 1
        self.ep_group = getattr(model, "ep_group", None)

    # ------------------------------------------------------------------ cache
    def _blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def _agree_layout(self) -> None:
        """Pipeline stages schedule alike only if their caches count blocks alike: keep the
        sliding layers' windows only when every stage has the same layout of groups (e.g.
        gpt-oss's alternating layers split evenly), else every stage keeps every token."""
        if self._layout_agreed:
            return
        self._layout_agreed = True
        layout = None if self._layer_windows is None else page_layout(self._layer_windows)[:2]
        sig = zlib.crc32(repr(layout).encode())
        t = torch.tensor([sig, -sig], dtype=torch.int64, device=self._comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.pp_group)
        if int(t[0]) != -int(t[1]):
            if self._layer_windows is not None:
                warnings.warn("the pipeline stages' sliding-window layers are laid out differently, so "
                              "their KV caches keep every token (an even split of the layer pattern "
                              "over the stages, e.g. with --decoder-first-pipeline-num-layers, avoids it)")
            self._layer_windows = None

    def _prefill_attend_from(self, length: int) -> int:
        """The first position of a ``length``-token prompt whose prefill reads the cache:
        none of a packed prefill's (they attend over their fresh K/V); a chunked one's last
        full chunk. Sliding layers need blocks from its window on (``PagedKVCache``)."""
        if length <= self.max_prefill_tokens:
            return length
        return max(0, length - self._chunk_step() - self.block_size)

    def _local_len(self, length: int, rank: Optional[int] = None) -> int:
        """Cached positions of a length-``length`` sequence that cp rank ``rank`` holds
        (p % cp == rank); rank 0 holds the most."""
        rank = self.cp_rank if rank is None else rank
        return max(0, -(-(length - rank) // self.cp_size))

    def _local_position(self, p: int) -> int:
        """Slot index of position p in this rank's shard, -1 when another cp rank holds it."""
        return p // self.cp_size if p % self.cp_size == self.cp_rank else -1

    def _cp_agree(self, free: int, need: int) -> tuple[int, int]:
        """(smallest free, largest need) over the cp ranks, so they schedule alike."""
        if self.cp_group is None:
            return free, need
        t = torch.tensor([-free, need], dtype=torch.int64, device=self._comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.cp_group)
        return int(-t[0]), int(t[1])

    def _ensure_cache(self, requests: Sequence[_Request]) -> None:
        self._agree_layout()
        # layers a block holds, and groups (block tables): a block of each makes room for
        # block_size more tokens of a sequence
        per_block, groups = self._num_layers, 1
        if self._layer_windows is not None:
            per_block, group_windows, _ = page_layout(self._layer_windows)
            groups = len(group_windows)
        if self.fixed_num_blocks is not None:
            n = self.fixed_num_blocks
        elif self.device.type == "cuda":
            if self.cache is not None:
                return
            # free on the device plus what PyTorch's allocator holds unused (after a training
            # step its cached activations are not "free" to the driver, yet ours to reuse)
            free, _ = torch.cuda.mem_get_info(self.device)
            free += torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
            n = blocks_for_memory(int(free * self.kv_memory_fraction), per_block,
                                  self.block_size, self._kv_heads, self._head_dim,
                                  self.dtype, self.latent_cache) - 1
        else:
            longest = self._local_len(max((len(r.tokens) + r.budget for r in requests), default=1), 0)
            concurrent = min(len(requests), self.max_batch_size)
            n = concurrent * (self._blocks_for(longest) + 1) * groups
        n = self._agree_min(max(1, n))
        if self.cache is not None and self.cache.num_blocks >= n:
            return
        self.cache = None  # free the old tensor before allocating the new one
        self.cache = PagedKVCache(self._num_layers, n, self.block_size, self._kv_heads,
                                  self._head_dim, self.dtype, self.device,
                                  layer_windows=self._layer_windows, keys_only=self.latent_cache)

    def _agree_min(self, n: int) -> int:
        """The ranks that run one schedule (tp, pp and cp decode groups) must see the same
        number of blocks, or their schedules would diverge. Other ranks (data parallel) run
        their own requests and are not involved, so a rank with no requests never waits."""
        groups = [g for g, size in ((self.model.tp_group, self.model.tp_size),
                                    (self.pp_group, self.pp_size), (self.cp_group, self.cp_size))
                  if g is not None and size > 1]
        if not groups:
            return n
        t = torch.tensor([n], dtype=torch.int64, device=self._comm_device())
        for g in groups:
            dist.all_reduce(t, op=dist.ReduceOp.MIN, group=g)
        return int(t.item())

    def _others_busy(self, busy: bool) -> bool:
        """Expert parallelism: tell the ep group whether this rank runs a forward now; whether
        any rank of it does."""
        t = torch.tensor([int(busy)], dtype=torch.int64, device=self._comm_device())
        dist.all_reduce(t, group=self.ep_group)
        return int(t.item()) > 0

    def any_rank_busy(self, busy: bool) -> bool:
        """Whether this rank or, under expert parallelism, any rank of its ep group has more
        requests to generate (a collective over the ep group): its engines run only together."""
        return self._others_busy(busy) if self.ep_group is not None else busy

    def _serve_experts_until_all_done(self) -> None:
        if self.ep_group is None:
            return
        while self._others_busy(False):
            self.model.serve_experts()

    def _comm_device(self):
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    def release(self) -> None:
        """Drop the KV cache (e.g. to give its memory to the training step)."""
        self.cache = None

    # ------------------------------------------------------------------ public API
    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens, params: SamplingParams,
                 generators: Optional[list[Optional[torch.Generator]]], eos_ids: Sequence[int],
                 repeat_detector: Optional[Callable[[], object]] = None,
                 progress: Optional[Callable[[int, int], None]] = None,
                 on_finish: Optional[Callable[[int, GenerationResult], None]] = None) -> list[GenerationResult]:
        """Generate for every prompt. ``max_new_tokens``: one budget or one per request.
        ``generators[i]`` drives request i's sampling (None = global RNG). ``repeat_detector()``
        makes a per-request detector (``push(token)``: True stops with ``repeat``, a string
        with that stop reason, e.g. ``stop_strings.StopStrings``' ``"stop"``).
        ``progress(done, total)`` is called as requests finish, ``on_finish(i, result)`` with
        each request's final result as soon as it has one (e.g. to grade it while others
        still decode)."""
        params.validate()
        budgets = list(max_new_tokens) if isinstance(max_new_tokens, (list, tuple)) \
            else [int(max_new_tokens)] * len(prompts)
        if len(budgets) != len(prompts):
            raise ValueError(f"{len(budgets)} budgets for {len(prompts)} prompts")
        generators = generators if generators is not None else [None] * len(prompts)
        requests = []
        for i, (p, b) in enumerate(zip(prompts, budgets)):
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty")
            det = repeat_detector() if repeat_detector is not None else None
            requests.append(_Request(i, list(p), int(b), generators[i], det, GenerationResult()))
        self._eos = set(eos_ids)
        self._params = params
        self._on_finish = on_finish
        was_training = self.model.training
        self.model.eval()
        t0 = time.perf_counter()
        try:
            self._run(requests, progress)
            self._serve_experts_until_all_done()
        finally:
            self.stats.seconds += time.perf_counter() - t0
            if was_training:
                self.model.train()
        return [r.result for r in requests]

    # ------------------------------------------------------------------ scheduler
    def _lane_capacities(self) -> list[int]:
        """Most requests each lane decodes together; they add up to ``max_batch_size``."""
        b, m = self.max_batch_size, self.num_lanes
        return [b // m + (1 if i < b % m else 0) for i in range(m)]

    def _run(self, requests: list[_Request], progress) -> None:
        """Turns of the lanes in a fixed round robin, identical on every rank.

        A turn of lane m: (1) apply the tokens its previous turn produced (append, stop,
        free finished requests' blocks), (2) admit waiting requests into it and prefill them,
        or else decode one token for its running requests, (3) start the tokens of that step
        on their way (the last stage samples and sends them to the other stages). With pp
        stages and pp lanes, stage s runs lane m while stage s+1 runs lane m-1: the tokens a
        lane needs for its next turn are ready by the time the first stage comes back to it.
        """
        waiting = deque()
        for r in requests:
            if r.budget <= 0:
                r.result.stop_reason = "length"
                if self._on_finish is not None:
                    self._on_finish(r.index, r.result)
            else:
                waiting.append(r)
        if not waiting:
            return
        self._ensure_cache(list(waiting))
        cache = self.cache
        block_bytes = cache.bytes_per_block  # (for the peak, once: the property builds a tensor)
        lanes: list[list[_Request]] = [[] for _ in range(self.num_lanes)]
        inflight: list[Optional[tuple]] = [None] * self.num_lanes  # (requests, tokens, log-probs)
        capacity = self._lane_capacities()
        self._done, self._total, self._progress = len(requests) - len(waiting), len(requests), progress
        m = 0
        try:
            while waiting or any(lanes):
                running = lanes[m]
                if inflight[m] is not None:
                    self._apply(*inflight[m], running)
                    inflight[m] = None
                admitted = self._admit(waiting, running, capacity[m], sum(len(lane) for lane in lanes))
                if not admitted and running:
                    self._make_room(running, waiting, any(lane for i, lane in enumerate(lanes) if i != m))
                if admitted:
                    with phase("prefill"):
                        reqs, logits = self._prefill(admitted)
                    running.extend(admitted)
                elif running:
                    with phase("decode"):
                        reqs, logits = running[:], self._decode(running)
                else:
                    if waiting and not any(lanes) and capacity[m] > 0:
                        r = waiting[0]
                        raise OutOfBlocks(
                            f"request {r.index} needs {self._new_request_blocks(r)} KV-cache "
                            f"blocks but the cache has {cache.num_blocks} (block size {self.block_size}); "
                            "give the engine more memory (num_blocks / kv_memory_fraction) or shorter "
                            "requests")
                    m = (m + 1) % self.num_lanes
                    continue
                inflight[m] = (reqs, *self._emit_tokens(reqs, logits))
                self.stats.steps += 1
                self.stats.peak_cache_bytes = max(self.stats.peak_cache_bytes,
                                                  cache.num_used_blocks * block_bytes)
                m = (m + 1) % self.num_lanes
        except BaseException:
            # the engine stays usable: no sequence keeps its blocks, and sends the peer will
            # never receive (it failed too, or is being torn down) are dropped, not waited for
            self._sends.clear()
            cache.reset()
            raise
        self._wait_sends(all_of_them=True)

    def _apply(self, reqs: list[_Request], tokens, logprobs, running: list[_Request]) -> None:
        """Append a step's tokens to its requests; finished ones leave ``running`` and free
        their blocks."""
        if tokens is None:  # not the last stage: the tokens come from it
            tokens, logprobs = self._recv_tokens(len(reqs))
        finished = self._append(reqs, tokens, logprobs)
        if finished:
            for r in finished:
                self.cache.free_sequence(r.index)
                if self._on_finish is not None:
                    self._on_finish(r.index, r.result)
            running[:] = [r for r in running if not r.result.stop_reason]
            self._done += len(finished)
            if self._progress is not None:
                self._progress(self._done, self._total)

    def _admit(self, waiting: deque, running: list[_Request], capacity: int, total: int) -> list[_Request]:
        """Take waiting requests while the lane's capacity, the prefill budget and free blocks
        allow, keeping a block free per running request of any lane (``total`` of them) for
        its next decode step. Identical token lists are admitted together (one prefill, then
        forks), also past the lane's capacity (never past ``max_batch_size``), so the k
        samples of a prompt are not split over lanes and prefilled twice."""
        free, _ = self._cp_agree(self.cache.num_free_blocks, 0)
        admitted, tokens, prompts = [], 0, set()
        per_step = self.cache.num_groups  # a decode step may start a block in every group
        reserve = total * per_step
        while waiting and total + len(admitted) < self.max_batch_size:
            r = waiting[0]
            key = tuple(r.tokens)
            fork = key in prompts
            if len(running) + len(admitted) >= capacity and not fork:
                break
            n = 0 if fork else len(r.tokens)  # a fork is not prefilled again
            need = self._new_request_blocks(r)
            if admitted and tokens + n > self.max_prefill_tokens:
                break
            if free - need < reserve:
                break
            admitted.append(waiting.popleft())
            prompts.add(key)
            free -= need
            tokens += n
            reserve += per_step
        return admitted

    def _new_request_blocks(self, r: _Request) -> int:
        """Blocks a waiting request needs for its prefill and first decode step (on cp rank
        0, which holds the most)."""
        length = len(r.tokens)
        return self.cache.new_blocks(None, self._local_len(length + 1, 0),
                                     attend_from=self._local_len(self._prefill_attend_from(length), 0))

    def _make_room(self, running: list[_Request], waiting: deque, others_running: bool) -> None:
        """Preempt the lane's newest requests until every one left has room for its next token.
        The last one is preempted too when other lanes hold blocks (they will free them);
        only a request that cannot fit on its own is an error."""
        cache = self.cache
        while running:
            need = sum(cache.new_blocks(r.index, self._local_len(len(r.tokens))) for r in running)
            free, need = self._cp_agree(cache.num_free_blocks, need)
            if need <= free:
                return
            if len(running) == 1 and not others_running:
                r = running[0]
                raise OutOfBlocks(
                    f"request {r.index} at {len(r.tokens)} tokens does not fit the KV cache "
                    f"({cache.num_blocks} blocks of {self.block_size}); give the engine more memory")
            victim = running.pop()
            cache.free_sequence(victim.index)
            waiting.appendleft(victim)
            self.stats.preemptions += 1

    # ------------------------------------------------------------------ steps
    def _prefill(self, admitted: list[_Request]):
        """Prefill the admitted requests; returns the requests that sample a first token
        (forks included) and, on the last stage, their logits."""
        cache = self.cache
        groups: dict[tuple, list[_Request]] = {}
        for r in admitted:
            groups.setdefault(tuple(r.tokens), []).append(r)
        heads = [g[0] for g in groups.values()]
        for r in heads:
            cache.add_sequence(r.index)
        if len(heads) == 1 and len(heads[0].tokens) > self.max_prefill_tokens:
            logits = self._prefill_chunks(heads[0])  # allocates chunk by chunk
        else:
            for r in heads:  # attends over its fresh K/V: sliding layers keep only the window
                n = self._local_len(len(r.tokens))
                cache.ensure_capacity(r.index, n, attend_from=n)
            logits = self._prefill_packed(heads)
        # forks share the prompt's full blocks; each samples its own first token
        rows, reqs = [], []
        for row, group in enumerate(groups.values()):
            for r in group[1:]:
                cache.fork(group[0].index, r.index)
            for r in group:
                rows.append(row)
                reqs.append(r)
        self.stats.prefill_tokens += sum(len(r.tokens) for r in heads)
        return reqs, None if logits is None else logits[rows]

    def _pad(self, ids: list[int], positions: list[int], slots: torch.Tensor):
        """Padding rows up to a multiple of the tp size (sequence parallelism splits N): token
        0 written to the scratch block."""
        extra = -len(ids) % self._pad_to
        if extra:
            ids = ids + [0] * extra
            positions = positions + list(range(extra))
            slots = torch.cat([slots, torch.full((*slots.shape[:-1], extra), -1, dtype=torch.int64)], -1)
        return ids, positions, slots, extra

    def _chunk_step(self) -> int:
        """Tokens per chunk of a chunked prefill (a multiple of the tp size)."""
        return max(self._pad_to, self.max_prefill_tokens - self.max_prefill_tokens % self._pad_to)

    def _prefill_packed(self, heads: list[_Request]) -> Optional[torch.Tensor]:
        """All prompts in one packed forward (varlen attention keeps them apart)."""
        lengths = [len(r.tokens) for r in heads]
        ids = [t for r in heads for t in r.tokens]
        positions = [p for n in lengths for p in range(n)]
        local = [range(n) for n in lengths] if self.cp_group is None else \
            [[self._local_position(p) for p in range(n)] for n in lengths]
        slots = self.cache.slot_mapping([r.index for r in heads], local, device="cpu")
        bounds = [0]
        for n in lengths:
            bounds.append(bounds[-1] + n)
        ids, positions, slots, extra = self._pad(ids, positions, slots)
        if extra:  # the padding is one more sequence
            bounds.append(len(ids))
        batch = InferenceBatch(
            self.cache, slots.to(self.device), decode=False,
            cu_seqlens=torch.tensor(bounds, dtype=torch.int32, device=self.device),
            max_seqlen=max(b - a for a, b in zip(bounds[:-1], bounds[1:])),
            decode_impl=self.decode_impl, prefill_attention=self.prefill_attention)
        last = torch.tensor(bounds[1:len(heads) + 1], device=self.device) - 1
        return self._forward(ids, positions, batch, last)

    def _prefill_chunks(self, r: _Request) -> Optional[torch.Tensor]:
        """A prompt longer than ``max_prefill_tokens`` (e.g. a partial rollout resumed at 100K
        tokens) in chunks of at most that many tokens, each attending over the cached K/V of
        the chunks before it, so activation memory is bounded by the chunk, not the prompt.
        Returns the last chunk's logits at its last token."""
        n = len(r.tokens)
        step = self._chunk_step()
        for start in range(0, n, step):
            end = min(n, start + step)
            # the chunk's queries read the cache from `start` on: sliding layers give back
            # the blocks before their window of it
            self.cache.ensure_capacity(r.index, self._local_len(end), attend_from=self._local_len(start))
            if self.cp_group is None:  # the chunk attends over cache slots [0, end)
                local, context = range(start, end), end
            else:  # over this rank's prefix shard (and its own K/V, which every rank has)
                local, context = [self._local_position(p) for p in range(start, end)], self._local_len(start)
            slots = self.cache.slot_mapping([r.index], [local], device="cpu")
            ids, positions, slots, _ = self._pad(r.tokens[start:end], list(range(start, end)), slots)
            batch = InferenceBatch(
                self.cache, slots.to(self.device), decode=False, decode_impl=self.decode_impl,
                prefill_attention=self.prefill_attention, cp_group=self.cp_group,
                prefix_seq=r.index, context_len=context, chunk_rows=end - start)
            last = end == n  # only the last chunk's last token samples
            logits = self._forward(ids, positions, batch,
                                   torch.tensor([end - start - 1], device=self.device) if last else None)
        return logits

    def _decode(self, running: list[_Request]) -> Optional[torch.Tensor]:
        """One token for every running request; the last stage returns their logits."""
        cache = self.cache
        seq_ids = [r.index for r in running]
        for r in running:
            cache.ensure_capacity(r.index, self._local_len(len(r.tokens)))
        n = len(running)
        padded = int(math.ceil(n / self._pad_to) * self._pad_to)
        ids = [r.tokens[-1] for r in running] + [0] * (padded - n)
        positions = [len(r.tokens) - 1 for r in running] + [0] * (padded - n)
        pos = torch.tensor([self._local_position(p) for p in positions[:n]] if self.cp_group is not None
                           else positions[:n], dtype=torch.int64)
        slots = cache.slot_mapping(seq_ids, pos, device="cpu")
        table = cache.block_table(seq_ids, device="cpu")
        lens = cache.seq_lens(seq_ids, device="cpu")
        if padded > n:
            slots = torch.cat([slots, torch.full((*slots.shape[:-1], padded - n), -1, dtype=torch.int64)], -1)
            table = torch.cat([table, torch.zeros(*table.shape[:-2], padded - n, table.shape[-1],
                                                  dtype=table.dtype)], -2)
            lens = torch.cat([lens, torch.zeros(padded - n, dtype=lens.dtype)])
        batch = InferenceBatch(cache, slots.to(self.device), decode=True,
                               block_tables=table.to(self.device), seq_lens=lens.to(self.device),
                               decode_impl=self.decode_impl, cp_group=self.cp_group,
                               decode_max_len=int(lens.max()) if len(lens) else 0)
        return self._forward(ids, positions, batch, torch.arange(n, device=self.device))

    def _forward(self, ids: list[int], positions: list[int], batch: InferenceBatch,
                 rows: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """Run this stage on the packed tokens; the last stage returns this tp rank's
        vocabulary shard of the logits at ``rows`` (fp32; None: no logits wanted), other
        stages send their hidden states on and return None."""
        model = self.model
        if self.ep_group is not None:
            self._others_busy(True)
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
        position_ids = torch.tensor([positions], dtype=torch.long, device=self.device)
        hidden = None
        if not model.pre_process:
            hidden = self._recv_hidden(len(ids))
        hidden = model.hidden_states(input_ids if model.pre_process else None, position_ids,
                                     batch.cu_seqlens, batch.max_seqlen, hidden=hidden, inference=batch)
        if not model.post_process:
            self._send_hidden(hidden)
            return None
        if rows is None:
            return None
        return model.local_logits_at(hidden, rows, torch.zeros_like(rows)).float()

    # ------------------------------------------------------------------ pipeline p2p
    def _hidden_shape(self, n_tokens: int):
        s = n_tokens // self.model.tp_size if self.model.sequence_parallel else n_tokens
        return (s, 1, self.model.config.hidden_size)

    def _recv_hidden(self, n_tokens: int) -> torch.Tensor:
        buf = torch.empty(self._hidden_shape(n_tokens), dtype=self.dtype, device=self.device)
        src = dist.get_global_rank(self.pp_group, self.pp_rank - 1)
        dist.recv(buf, src=src)
        return buf

    def _send_hidden(self, hidden: torch.Tensor) -> None:
        self._isend(hidden, dist.get_global_rank(self.pp_group, self.pp_rank + 1))

    def _isend(self, tensor: torch.Tensor, dst: int, group=None) -> None:
        """Send without waiting: the receiver takes it when its turn comes. Handles are kept
        (with their tensors) until they complete."""
        tensor = tensor.contiguous()
        self._sends.append((dist.isend(tensor, dst=dst, group=group), tensor))
        self._wait_sends()

    def _wait_sends(self, all_of_them: bool = False) -> None:
        while self._sends and (all_of_them or self._sends[0][0].is_completed()):
            self._sends.popleft()[0].wait()

    def _recv_tokens(self, n: int):
        """This step's tokens and log-probs from the last stage (same tp and cp rank)."""
        packed = torch.empty(2, n, dtype=torch.float64, device=self._comm_device())
        dist.recv(packed, src=dist.get_global_rank(self.pp_group, self.pp_size - 1), group=self._token_group)
        return packed[0].long(), packed[1].float()

    # ------------------------------------------------------------------ sampling
    def _emit_tokens(self, reqs: list[_Request], logits: Optional[torch.Tensor]):
        """Last stage: sample ``reqs``' next tokens (vocabulary-parallel over tp: the tp ranks
        draw the same tokens from their shards), make them known to every cp rank of the
        stage and send them to the other stages; returns (tokens, log-probs). Other stages
        return (None, None) and receive them at the lane's next turn."""
        model = self.model
        if not model.post_process:
            return None, None
        # vocab-parallel: every tp rank gets the same tokens, and the vocabulary stays sharded
        tokens, logprobs = sample_tokens_vocab_parallel(
            logits, self._params, [r.generator for r in reqs],
            model.tp_group if model.tp_size > 1 else None,
            vocab_start=model.tp_rank * model.vocab_per_rank, vocab_size=model.config.vocab_size)
        tokens, logprobs = tokens.to(torch.int64), logprobs.float()
        if self.pp_size == 1 and self.cp_group is None:
            return tokens, logprobs
        packed = torch.stack([tokens.double(), logprobs.double()]).to(self._comm_device())
        if self.cp_group is not None:
            dist.broadcast(packed, src=dist.get_global_rank(self.cp_group, 0), group=self.cp_group)
        for stage in range(self.pp_size - 1):
            self._isend(packed, dist.get_global_rank(self.pp_group, stage), self._token_group)
        return packed[0].long(), packed[1].float()

    def _append(self, reqs: list[_Request], tokens: torch.Tensor, logprobs: torch.Tensor) -> list[_Request]:
        """Append one token to each request and set stop reasons; returns the finished ones."""
        self.stats.generated_tokens += len(reqs)
        finished = []
        for r, tok, lp in zip(reqs, tokens.tolist(), logprobs.tolist()):
            r.tokens.append(tok)
            res = r.result
            res.output_ids.append(tok)
            res.output_logprobs.append(lp)
            why = r.detector.push(tok) if r.detector is not None and tok not in self._eos else None
            if tok in self._eos:
                res.stop_reason = "eos"
            elif why:
                res.stop_reason = why if isinstance(why, str) else "repeat"
            elif len(res.output_ids) >= r.budget:
                res.stop_reason = "length"
            if res.stop_reason:
                finished.append(r)
        return finished


class RecomputeGenerator:
    """``generate_recompute`` behind the engine's interface (``--inference-engine recompute``)."""

    def __init__(self, model):
        self.model = model
        self.stats = EngineStats()

    def generate(self, prompts, max_new_tokens, params, generators, eos_ids, repeat_detector=None,
                 progress=None, on_finish=None):
        t0 = time.perf_counter()
        gens = generators if generators is not None else [None] * len(prompts)
        out = generate_recompute(self.model, prompts, max_new_tokens, params, gens, eos_ids, repeat_detector)
        for i, res in enumerate(out if on_finish is not None else []):
            on_finish(i, res)
        self.stats.seconds += time.perf_counter() - t0
        self.stats.generated_tokens += sum(len(r.output_ids) for r in out)
        if progress is not None:
            progress(len(out), len(out))
        return out

    def release(self) -> None:
        pass


def build_generator(model, args, *, max_batch_size: int = 256, pp_group=None, cp_group=None):
    """The generator the CLI flags ask for (``arguments.add_inference_args``)."""
    kind = getattr(args, "inference_engine", "paged")
    if kind == "recompute":
        if getattr(model, "ep_group", None) is not None:
            raise ValueError("--inference-engine recompute does not run expert parallelism "
                             "(--expert-model-parallel-size > 1); use --inference-engine paged")
        if pp_group is not None or cp_group is not None:
            raise ValueError("--inference-engine recompute supports tensor parallelism only; "
                             "use --inference-engine paged")
        return RecomputeGenerator(model)
    return GenerationEngine(
        model, block_size=getattr(args, "kv_cache_block_size", 16), max_batch_size=max_batch_size,
        max_prefill_tokens=getattr(args, "max_prefill_tokens", 16384),
        kv_memory_fraction=getattr(args, "kv_cache_memory_fraction", 0.5), pp_group=pp_group,
        cp_group=cp_group)
