"""`DecodeEngine`: continuous batching of every live sequence, one token per sequence per step.

Sequences arrive with a finished prefill (`import_state`: a HybridState and the first token,
from a local prefill engine or a remote one), wait in FIFO order until the cache pool has a
slot and pages for them, then join the running batch at the next step and leave it the step
they finish (stop token, max_tokens, max_model_len) or are cancelled; their slot and pages go
back to the pool at once. Each step pads the batch to the smallest of a few bucket sizes and
the page table to the smallest context bucket (default 4K, 16K, 64K, ... up to max_model_len),
so a whole run compiles at most len(batch_buckets) * len(context_buckets) programs
(`warmup()` compiles them all up front).

Pages are reserved for a sequence's whole life at admission (prompt + max_tokens - 1 rows,
capped at max_model_len): a running sequence can never run out of cache mid-decode, so there
is no preemption; the price is that pages of sequences that stop early sit reserved until
they stop. One thread drives `step()`; nothing here is thread-safe.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Callable, Iterator, Sequence

import jax.numpy as jnp
import numpy as np

from jaxprfaas.errors import JaxprfaasError
from jaxprfaas.model.state import HybridState
from jaxprfaas.runtime import model_runner
from jaxprfaas.runtime.cache_pool import DEFAULT_PAGE_SIZE, CachePool, PoolLayout, SeqBlocks
from jaxprfaas.runtime.request import FinishReason, Request, TokenEvent, finish_reason

DEFAULT_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclasses.dataclass
class _Seq:
    request: Request
    blocks: SeqBlocks | None     # None while waiting for admission
    length: int                  # tokens whose state is in the cache
    last_token: int              # the next decode input (the latest generated token)
    generated: list[int]         # every generated token so far (the first came from prefill)
    state: HybridState | None    # held only until admission writes it into the pool


class DecodeEngine:
    def __init__(self, model, pool: CachePool | None = None, *, pool_bytes: int | None = None,
                 page_size: int = DEFAULT_PAGE_SIZE, max_batch: int = 64, max_model_len: int = 4096,
                 batch_buckets: Sequence[int] | None = None, context_buckets: Sequence[int] | None = None,
                 impl: str = "auto", on_event: Callable[[TokenEvent], None] | None = None):
        self.config = model.config
        if pool is None:
            layout = (PoolLayout.from_bytes(self.config, pool_bytes, page_size=page_size, max_seqs=max_batch)
                      if pool_bytes is not None else
                      PoolLayout.from_device(self.config, page_size=page_size, max_seqs=max_batch))
            pool = CachePool(layout)
        self.pool = pool
        self.max_batch = min(max_batch, pool.layout.num_slots)
        if self.max_batch < 1:
            raise JaxprfaasError("decode engine: the pool has no slots")
        self.max_model_len = int(max_model_len)
        buckets = sorted({b for b in (batch_buckets or DEFAULT_BATCH_BUCKETS) if b < self.max_batch})
        self.batch_buckets = tuple(buckets) + (self.max_batch,)
        ps = pool.page_size
        if context_buckets is None:
            # the MLA gather reads a whole page-table width per row: without buckets a 128K
            # max_model_len would gather 128K rows for every 300-token chat. x4 steps from 4K.
            context_buckets = [4096 * 4 ** i for i in range(8) if 4096 * 4 ** i < self.max_model_len]
        ctx = sorted({-(-c // ps) for c in context_buckets if c < self.max_model_len})
        self.page_buckets = tuple(ctx) + (-(-self.max_model_len // ps),)  # pages per sequence
        self.on_event = on_event
        self._step = model_runner.DecodeStep(model, impl)
        self.waiting: collections.deque[_Seq] = collections.deque()
        self.running: dict[str, _Seq] = {}
        self._events: list[TokenEvent] = []
        self.sinks: list = []   # PoolSinks whose pump() runs before each step
        self.steps = 0

    # ---- admission ---------------------------------------------------------------------------
    def import_state(self, request: Request, state: HybridState, first_token: int) -> None:
        """Queue a prefilled sequence: `state` holds exactly its prompt (one sequence) and
        `first_token` is the token sampled from the prefill's last logits (generated index 0).
        Raises PoolTooSmall / JaxprfaasError for a request that can never run."""
        rid = request.request_id
        if rid in self.running or any(s.request.request_id == rid for s in self.waiting):
            raise JaxprfaasError(f"request {rid} is already in the decode engine")
        if state.batch != 1:
            raise JaxprfaasError(f"request {rid}: import_state takes a one-sequence state, got {state.batch}")
        n = int(np.asarray(state.lengths)[0])
        if n != request.prompt_len:
            raise JaxprfaasError(f"request {rid}: the state holds {n} tokens but the prompt has "
                                 f"{request.prompt_len}")
        if n >= self.max_model_len:
            raise JaxprfaasError(f"request {rid}: prompt of {n} tokens leaves no room under "
                                 f"max_model_len={self.max_model_len}")
        if request.params.max_tokens < 1:
            raise JaxprfaasError(f"request {rid}: max_tokens={request.params.max_tokens} leaves nothing to decode")
        if not 0 <= int(first_token) < self.config.vocab_size:
            raise JaxprfaasError(f"request {rid}: first token {first_token} outside the vocabulary")
        self.pool.check_fits_ever(rid, self._reserve_tokens(request))
        seq = _Seq(request, None, n, int(first_token), [int(first_token)], state)
        # the first token came from prefill: it may already end the request
        why = finish_reason(request.params, int(first_token), 1)
        self._emit(TokenEvent(rid, int(first_token), 0, why), request)
        if why is None:
            self.waiting.append(seq)
            self._admit()

    def adopt(self, request: Request, first_token: int) -> None:
        """Join the batch with a state that is already in the pool: the caller allocated
        `pool.allocate(request_id, tokens)` (tokens >= what `reserve_tokens(request)` says) and
        wrote the prompt's state through the pool's write API (a transfer receiver writing
        chunks in place). This is the commit step of a remote prefill; `pool.free` is its abort."""
        rid = request.request_id
        blocks = self.pool.seqs.get(rid)
        if blocks is None:
            raise JaxprfaasError(f"request {rid}: adopt needs pool memory allocated under its id")
        if blocks.reserved_tokens < self.reserve_tokens(request) and self.config.mla_layers:
            raise JaxprfaasError(f"request {rid}: {blocks.reserved_tokens} tokens of pages reserved, "
                                 f"decode needs {self.reserve_tokens(request)}")
        if rid in self.running or any(q.request.request_id == rid for q in self.waiting):
            raise JaxprfaasError(f"request {rid} is already in the decode engine")
        seq = _Seq(request, blocks, request.prompt_len, int(first_token), [int(first_token)], None)
        why = finish_reason(request.params, int(first_token), 1)
        self._emit(TokenEvent(rid, int(first_token), 0, why), request)
        if why is None:
            self.waiting.append(seq)   # joins at the next step with room in the batch
            self._admit()
        else:
            self.pool.free(rid)

    def reserve_tokens(self, request: Request) -> int:
        """Cache rows a request needs for its whole life here (prompt + max_tokens - 1, capped)."""
        return self._reserve_tokens(request)

    def _reserve_tokens(self, request: Request) -> int:
        return min(request.prompt_len + request.params.max_tokens - 1, self.max_model_len)

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.max_batch:
            seq = self.waiting[0]
            rid = seq.request.request_id
            if seq.blocks is None:     # imported: needs pool memory and its state written
                tokens = self._reserve_tokens(seq.request)
                if not self.pool.can_allocate(tokens):
                    return  # FIFO: later arrivals wait behind the head so nobody starves
                seq.blocks = self.pool.allocate(rid, tokens)
                self.pool.write_state(rid, seq.state)
                seq.state = None
            self.waiting.popleft()
            self.running[rid] = seq

    # ---- control -----------------------------------------------------------------------------
    def cancel(self, request_id: str) -> bool:
        """Stop a request wherever it is; its slot and pages are free when this returns."""
        for seq in list(self.waiting):
            if seq.request.request_id == request_id:
                self.waiting.remove(seq)
                self.pool.free(request_id)   # an adopted sequence already holds pool memory
                self._emit(TokenEvent(request_id, None, len(seq.generated), FinishReason.CANCELLED), seq.request)
                return True
        seq = self.running.pop(request_id, None)
        if seq is None:
            return False
        self.pool.free(request_id)
        self._emit(TokenEvent(request_id, None, len(seq.generated), FinishReason.CANCELLED), seq.request)
        self._admit()
        return True

    def has_work(self) -> bool:
        return bool(self.running or self.waiting or self._events or any(s.pending() for s in self.sinks))

    @property
    def compile_count(self) -> int:
        """Decode programs traced so far in this process (one per new (batch, pages) shape)."""
        return model_runner.trace_counts["decode"]

    # ---- the step ----------------------------------------------------------------------------
    def step(self) -> list[TokenEvent]:
        """Admit what fits, decode one token for every running sequence, retire finished ones."""
        for sink in self.sinks:
            sink.pump()
        self._admit()
        seqs = list(self.running.values())
        if seqs:
            toks = self._run(seqs)
            self.steps += 1
            for seq, tok in zip(seqs, toks.tolist()):
                seq.length += 1
                seq.generated.append(tok)
                seq.last_token = tok
                rid = seq.request.request_id
                why = finish_reason(seq.request.params, tok, len(seq.generated))
                if why is None and seq.length >= self.max_model_len:
                    why = FinishReason.LENGTH
                if why is not None:
                    del self.running[rid]
                    self.pool.free(rid)
                self._emit(TokenEvent(rid, tok, len(seq.generated) - 1, why), seq.request)
            self._admit()
        events, self._events = self._events, []
        return events

    def stream(self) -> Iterator[TokenEvent]:
        """Step until nothing is left, yielding every event as it happens."""
        while self.has_work():
            yield from self.step()

    def warmup(self) -> int:
        """Compile every (batch bucket, context bucket) program on an all-padding batch."""
        for b in self.batch_buckets:
            for w in self.page_buckets:
                self._call(*_padding_batch(b, w))
        return self.compile_count

    def _run(self, seqs: list[_Seq]) -> np.ndarray:
        n = len(seqs)
        b = next(x for x in self.batch_buckets if x >= n)
        ps = self.pool.page_size
        need = max(s.length // ps + 1 for s in seqs)
        w = next(x for x in self.page_buckets if x >= need)
        tokens, slots, table, lengths, temp, topk, topp, seeds, steps = _padding_batch(b, w)
        for i, s in enumerate(seqs):
            p = s.request.params
            tokens[i], slots[i], lengths[i] = s.last_token, s.blocks.slot, s.length
            pages = s.blocks.pages[:w]
            table[i, :len(pages)] = pages
            temp[i], topk[i], topp[i], seeds[i], steps[i] = p.temperature, p.top_k, p.top_p, p.seed, len(s.generated)
        out = self._call(tokens, slots, table, lengths, temp, topk, topp, seeds, steps)
        return np.asarray(out)[:n]

    def _call(self, tokens, slots, table, lengths, temp, topk, topp, seeds, steps):
        nxt, self.pool.arrays = self._step(self.pool.arrays, jnp.asarray(tokens), jnp.asarray(slots),
                                           jnp.asarray(table), jnp.asarray(lengths), jnp.asarray(temp),
                                           jnp.asarray(topk), jnp.asarray(topp), jnp.asarray(seeds),
                                           jnp.asarray(steps))
        return nxt

    def _emit(self, ev: TokenEvent, request: Request) -> None:
        self._events.append(ev)
        if request.on_token is not None:
            request.on_token(ev)
        if self.on_event is not None:
            self.on_event(ev)


def _padding_batch(b: int, w: int):
    """Host arrays of an all-padding batch of b rows and w pages (slot -1 rows write nothing)."""
    return (np.zeros(b, np.int32), np.full(b, -1, np.int32), np.zeros((b, w), np.int32),
            np.zeros(b, np.int32), np.zeros(b, np.float32), np.zeros(b, np.int32), np.ones(b, np.float32),
            np.zeros(b, np.uint32), np.zeros(b, np.int32))


class PoolSink:
    """`transfer.StateSink` over a decode engine's pool: the receiving end of a remote prefill.

    `begin` reserves the request's slot and pages (`SinkFull` when the pool cannot hold it now),
    `write` stages each chunk in host memory (`state_codec.StateAssembler`) and, as soon as a
    piece is complete, queues it for the device, `commit` checks the digest and queues the
    request to join the batch, `abort` releases everything. gRPC threads call those four; the
    device writes and the admission happen in `pump()`, which the thread that drives the
    engine runs before each step (`DecodeEngine.step` does it for an attached sink), because
    only that thread may replace the pool's arrays.

    `lookup(request_id, annex) -> (Request, first_token)` tells the sink what was asked for each
    incoming state (`annex`: the sender's opaque `TransferMeta.annex`, e.g. the serialized
    request; or the router sent it beside the transfer). A manifest with prefix rows
    (MLA rows the decode node already holds) is refused until prefix caching lands here.
    """

    def __init__(self, engine: DecodeEngine, lookup: Callable[[str, bytes], tuple[Request, int]]):
        import threading

        from jaxprfaas.runtime import state_codec
        self.engine, self.lookup, self._codec = engine, lookup, state_codec
        self._lock = threading.Lock()
        self._open: dict[str, tuple] = {}       # rid -> (request, first_token, assembler)
        self._ready: list[tuple] = []           # (rid, piece) complete on the host, not yet on the device
        self._commits: list[str] = []
        self._aborts: list[str] = []
        engine.sinks.append(self)

    def begin(self, request_id: str, meta) -> None:
        from jaxprfaas.runtime.cache_pool import PoolFull
        from jaxprfaas.runtime.transfer import SinkFull
        with self._lock:
            if request_id in self._open:
                return                                   # a resumed transfer keeps its reservation
            request, first = self.lookup(request_id, getattr(meta, "annex", b""))
            if tuple(meta.lengths) != (request.prompt_len,):
                raise self._codec.CodecError(f"transfer {request_id}: state lengths {list(meta.lengths)}, "
                                             f"the request's prompt has {request.prompt_len} tokens")
            if meta.prefix_rows:
                raise self._codec.CodecError(f"transfer {request_id}: prefix rows are not held by this pool")
            try:
                self.engine.pool.allocate(request_id, self.engine.reserve_tokens(request))
            except PoolFull as e:
                raise SinkFull(str(e)) from None
            asm = self._codec.StateAssembler(self.engine.config, meta.lengths, meta.pieces)
            self._open[request_id] = (request, first, asm)

    def write(self, request_id: str, seq: int, piece, offset: int, payload) -> None:
        entry = self._open.get(request_id)
        if entry is not None and entry[2].write(seq, piece, offset, payload):
            with self._lock:
                self._ready.append((request_id, piece))

    def commit(self, request_id: str) -> int | None:
        with self._lock:
            request, first, asm = self._open[request_id]
            if not asm.complete:
                raise self._codec.CodecError(f"transfer {request_id}: commit before every byte arrived")
            self._commits.append(request_id)
        return asm.digest()

    def abort(self, request_id: str, reason: str) -> None:
        with self._lock:
            if request_id in self._open:
                self._aborts.append(request_id)

    def pending(self) -> bool:
        return bool(self._ready or self._commits or self._aborts)

    def pump(self) -> None:
        """Engine thread: move completed pieces to the device, admit committed requests."""
        with self._lock:
            ready, self._ready = self._ready, []
            commits, self._commits = self._commits, []
            aborts, self._aborts = self._aborts, []
        pool, cfg = self.engine.pool, self.engine.config
        for rid in aborts:
            self._open.pop(rid, None)
            pool.free(rid)
        for rid, piece in ready:
            entry = self._open.get(rid)
            if entry is None:
                continue
            asm = entry[2]
            arr = asm.array(piece)
            if piece.kind == "mla_latent":
                pool.write_latent(rid, cfg.mla_layers.index(piece.layer), piece.row_start, arr)
            else:                                   # a KDA layer goes in once both its pieces are here
                i = cfg.kda_layers.index(piece.layer)
                other = "conv" if piece.kind == "kda_state" else "kda_state"
                key = (piece.layer, other)
                if asm.piece_bytes[key] == asm._index[key].nbytes:
                    rec = asm.array(asm._index[(piece.layer, "kda_state")])
                    conv = asm.array(asm._index[(piece.layer, "conv")])
                    pool.write_kda(rid, i, rec, conv)
        for rid in commits:
            request, first, _ = self._open.pop(rid)
            self.engine.adopt(request, first)
