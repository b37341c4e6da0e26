"""`CachePool`: the device memory that holds every live sequence's hybrid state.

A Kimi Linear sequence owns two kinds of state (reference/kimi-linear.md §3):
  * per KDA layer a fixed-size *slot*: the fp32 recurrent state [H, K, V] and the short-conv
    tail [W-1, 3HK] (41.4 MiB per sequence for 48B-A3B, whatever its length);
  * per MLA layer a growing latent cache, kept in *pages* of `page_size` rows of
    [kv_lora_rank + rope_dim] (1,152 B per token per layer for 48B-A3B), found through the
    sequence's page table.
One slot index and one page table serve every layer (as vLLM's and SGLang's hybrid pools do),
so allocation is per sequence, not per layer.

Default page size 64 tokens: a page is 64 x 1,152 B = 72 KiB per MLA layer, long enough that
the decode gather reads full-bandwidth contiguous runs; the tail waste (< 64 tokens x 8,064 B
= 0.5 MB per sequence) is ~1% of the fixed 41.4 MiB KDA state; and 64 is `chunk_kda`'s chunk,
so prefix blocks end where chunked prefill already has a KDA state to snapshot.

Bookkeeping lives on the host (free lists, reference counts); the arrays live on the device
and are replaced functionally by jitted writes that donate the old buffer, so on GPU every
write is in place. Byte accounting is exact: `capacity_bytes` equals the sum of the device
arrays' sizes and `used_bytes` is slots_in_use * slot_bytes + pages_in_use * page_bytes.
The pool never hands out a slot or page that is still referenced: a request that does not fit
now gets `PoolFull` (the caller queues it); one that can never fit gets `PoolTooSmall`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import threading
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxprfaas.errors import JaxprfaasError
from jaxprfaas.model.config import ModelConfig

DEFAULT_PAGE_SIZE = 64


class PoolFull(JaxprfaasError):
    """Not enough free slots/pages right now; retry after other sequences finish."""


class PoolTooSmall(JaxprfaasError):
    """The request needs more than the whole pool holds: it can never be admitted."""


@struct.dataclass
class PoolArrays:
    """The device buffers (a pytree, so the decode step can take and return it whole)."""
    recurrent: tuple  # per KDA layer: [num_slots, H, K, V] float32
    conv: tuple       # per KDA layer: [num_slots, W-1, 3HK] model dtype
    latent: tuple     # per MLA layer: [num_pages, page_size, latent_dim] model dtype


@dataclasses.dataclass(frozen=True)
class PoolLayout:
    """Shapes and byte sizes of a pool for one model config."""
    config: ModelConfig
    num_slots: int
    num_pages: int
    page_size: int = DEFAULT_PAGE_SIZE

    @property
    def slot_bytes(self) -> int:
        """Bytes of one sequence's KDA state over all KDA layers (recurrent + conv tail)."""
        c = self.config
        item = jnp.dtype(c.dtype).itemsize
        h, k = c.kda_num_heads, c.kda_head_dim
        return len(c.kda_layers) * (h * k * k * 4 + (c.conv_kernel_size - 1) * 3 * h * k * item)

    @property
    def page_bytes(self) -> int:
        """Bytes of one page over all MLA layers."""
        c = self.config
        return len(c.mla_layers) * self.page_size * c.latent_dim * jnp.dtype(c.dtype).itemsize

    @property
    def capacity_bytes(self) -> int:
        return self.num_slots * self.slot_bytes + self.num_pages * self.page_bytes

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size) if self.config.mla_layers else 0

    @staticmethod
    def from_bytes(config: ModelConfig, budget_bytes: int, *, page_size: int = DEFAULT_PAGE_SIZE,
                   max_seqs: int = 256, min_tokens_per_seq: int = 0) -> "PoolLayout":
        """The largest pool within `budget_bytes`: `max_seqs` slots (fewer if the budget is short,
        keeping room for `min_tokens_per_seq` tokens of pages each) and pages for the rest."""
        if page_size <= 0:
            raise JaxprfaasError(f"page_size must be > 0, got {page_size}")
        probe = PoolLayout(config, 1, 1, page_size)
        per_seq = probe.slot_bytes + probe.pages_for(max(min_tokens_per_seq, 1)) * probe.page_bytes
        slots = min(max_seqs, budget_bytes // per_seq)
        if slots < 1:
            raise PoolTooSmall(f"a pool of {budget_bytes} B cannot hold one sequence ({per_seq} B: "
                               f"{probe.slot_bytes} B of KDA state + one page)")
        rest = budget_bytes - slots * probe.slot_bytes
        pages = rest // probe.page_bytes if probe.page_bytes else 0
        return PoolLayout(config, int(slots), int(pages), page_size)

    @staticmethod
    def from_device(config: ModelConfig, *, fraction: float = 0.9, device=None, **kw) -> "PoolLayout":
        """Size the pool from the device's free memory (`bytes_limit - bytes_in_use`, times fraction)."""
        device = device or jax.devices()[0]
        stats = device.memory_stats() if hasattr(device, "memory_stats") else None
        if not stats or "bytes_limit" not in stats:
            raise JaxprfaasError(f"{device.platform} device reports no memory limit; pass pool_bytes explicitly")
        free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
        return PoolLayout.from_bytes(config, int(free * fraction), **kw)


@dataclasses.dataclass
class SeqBlocks:
    """What one sequence holds: its slot and its page table (shared pages are refcounted)."""
    slot: int
    pages: list[int]
    reserved_tokens: int  # pages cover this many tokens


class CachePool:
    def __init__(self, layout: PoolLayout):
        self.layout = layout
        c = layout.config
        dt = jnp.dtype(c.dtype)
        h, k, w = c.kda_num_heads, c.kda_head_dim, c.conv_kernel_size
        s, p = layout.num_slots, layout.num_pages
        self.arrays = PoolArrays(
            recurrent=tuple(jnp.zeros((s, h, k, k), jnp.float32) for _ in c.kda_layers),
            conv=tuple(jnp.zeros((s, w - 1, 3 * h * k), dt) for _ in c.kda_layers),
            latent=tuple(jnp.zeros((p, layout.page_size, c.latent_dim), dt) for _ in c.mla_layers),
        )
        self._free_slots = list(range(s - 1, -1, -1))   # pop() hands out slot 0 first
        self._free_pages = list(range(p - 1, -1, -1))
        self._slot_ref = np.zeros(s, np.int32)
        self._page_ref = np.zeros(p, np.int32)
        self.seqs: dict[str, SeqBlocks] = {}
        # guards the bookkeeping (a transfer receiver allocates from its threads); the device
        # arrays are only ever replaced by the thread that drives the decode engine
        self.lock = threading.RLock()

    @staticmethod
    def from_bytes(config: ModelConfig, budget_bytes: int, **kw) -> "CachePool":
        return CachePool(PoolLayout.from_bytes(config, budget_bytes, **kw))

    # ---- accounting ----------------------------------------------------------------------------
    @property
    def config(self) -> ModelConfig:
        return self.layout.config

    @property
    def page_size(self) -> int:
        return self.layout.page_size

    @property
    def capacity_bytes(self) -> int:
        return self.layout.capacity_bytes

    @property
    def device_bytes(self) -> int:
        """Bytes of the device arrays (equals capacity_bytes; a test pins it)."""
        return sum(a.nbytes for a in jax.tree.leaves(self.arrays))

    @property
    def slots_in_use(self) -> int:
        return self.layout.num_slots - len(self._free_slots)

    @property
    def pages_in_use(self) -> int:
        return self.layout.num_pages - len(self._free_pages)

    @property
    def used_bytes(self) -> int:
        return self.slots_in_use * self.layout.slot_bytes + self.pages_in_use * self.layout.page_bytes

    @property
    def free_bytes(self) -> int:
        return self.capacity_bytes - self.used_bytes

    # ---- allocation ----------------------------------------------------------------------------
    def check_fits_ever(self, seq_id: str, tokens: int) -> None:
        need = self.layout.pages_for(tokens)
        if need > self.layout.num_pages or self.layout.num_slots < 1:
            raise PoolTooSmall(
                f"sequence {seq_id}: {tokens} tokens need {need} pages of {self.page_size} tokens but the "
                f"pool has {self.layout.num_pages} pages ({self.capacity_bytes} B in all); it can never fit")

    def can_allocate(self, tokens: int) -> bool:
        return bool(self._free_slots) and self.layout.pages_for(tokens) <= len(self._free_pages)

    def _allocate_unlocked(self, seq_id: str, tokens: int) -> SeqBlocks:
        """A slot and pages for `tokens` tokens. PoolFull if not now, PoolTooSmall if never."""
        if seq_id in self.seqs:
            raise JaxprfaasError(f"sequence {seq_id} already holds pool memory")
        self.check_fits_ever(seq_id, tokens)
        need = self.layout.pages_for(tokens)
        if not self._free_slots or need > len(self._free_pages):
            raise PoolFull(f"sequence {seq_id}: needs 1 slot + {need} pages; free: {len(self._free_slots)} "
                           f"slots, {len(self._free_pages)} pages")
        slot = self._free_slots.pop()
        self._slot_ref[slot] = 1
        pages = [self._free_pages.pop() for _ in range(need)]
        self._page_ref[pages] = 1
        blocks = SeqBlocks(slot, pages, need * self.page_size)
        self.seqs[seq_id] = blocks
        return blocks

    def _extend_unlocked(self, seq_id: str, tokens: int) -> SeqBlocks:
        """Grow a sequence's page table to cover `tokens` tokens (PoolFull leaves it unchanged)."""
        b = self._get(seq_id)
        need = self.layout.pages_for(tokens) - len(b.pages)
        if need <= 0:
            return b
        if need > len(self._free_pages):
            raise PoolFull(f"sequence {seq_id}: needs {need} more pages; {len(self._free_pages)} free")
        new = [self._free_pages.pop() for _ in range(need)]
        self._page_ref[new] = 1
        b.pages.extend(new)
        b.reserved_tokens = len(b.pages) * self.page_size
        return b

    def _share_pages_unlocked(self, src_id: str, dst_id: str, n_pages: int) -> None:
        """Let `dst_id` start with the first `n_pages` of `src_id` (a shared prefix, refcounted).
        `dst_id` must not hold any pages yet (allocate it with 0 tokens first)."""
        src, dst = self._get(src_id), self._get(dst_id)
        if dst.pages or n_pages > len(src.pages):
            raise JaxprfaasError(f"cannot share {n_pages} pages of {src_id} into {dst_id}")
        shared = src.pages[:n_pages]
        self._page_ref[shared] += 1
        dst.pages = list(shared)
        dst.reserved_tokens = n_pages * self.page_size

    def _free_unlocked(self, seq_id: str) -> None:
        """Drop a sequence's references; slots/pages return to the free lists at refcount 0.
        Unknown ids are fine (idempotent, so cancel and finish may race)."""
        b = self.seqs.pop(seq_id, None)
        if b is None:
            return
        self._slot_ref[b.slot] -= 1
        if self._slot_ref[b.slot] == 0:
            self._free_slots.append(b.slot)
        for p in b.pages:
            self._page_ref[p] -= 1
            if self._page_ref[p] == 0:
                self._free_pages.append(p)

    # the thread-safe entry points (each body above says what it does)
    def allocate(self, seq_id: str, tokens: int) -> SeqBlocks:
        with self.lock:
            return self._allocate_unlocked(seq_id, tokens)

    def extend(self, seq_id: str, tokens: int) -> SeqBlocks:
        with self.lock:
            return self._extend_unlocked(seq_id, tokens)

    def share_pages(self, src_id: str, dst_id: str, n_pages: int) -> None:
        with self.lock:
            self._share_pages_unlocked(src_id, dst_id, n_pages)

    def free(self, seq_id: str) -> None:
        with self.lock:
            self._free_unlocked(seq_id)

    def _get(self, seq_id: str) -> SeqBlocks:
        try:
            return self.seqs[seq_id]
        except KeyError:
            raise JaxprfaasError(f"sequence {seq_id} holds no pool memory") from None

    # ---- the write API (the transfer receiver and import_state use it) ---------------------------
    def write_kda(self, seq_id: str, kda_index: int, recurrent, conv) -> None:
        """KDA layer `kda_index` (position in config.kda_layers) of one sequence:
        recurrent [H, K, V] (or [1, H, K, V]) float32, conv [W-1, 3HK] (or [1, W-1, 3HK])."""
        b = self._get(seq_id)
        a = self.arrays
        rec_pool, conv_pool = a.recurrent[kda_index], a.conv[kda_index]
        recurrent = _one_row(recurrent, rec_pool.shape[1:], "recurrent")
        conv = _one_row(conv, conv_pool.shape[1:], "conv")
        rec_pool, conv_pool = _set_slot(rec_pool, conv_pool, jnp.int32(b.slot), recurrent, conv)
        rec = list(a.recurrent); rec[kda_index] = rec_pool
        cnv = list(a.conv); cnv[kda_index] = conv_pool
        self.arrays = a.replace(recurrent=tuple(rec), conv=tuple(cnv))

    def write_latent(self, seq_id: str, mla_index: int, start: int, rows, n: int | None = None) -> None:
        """MLA layer `mla_index` (position in config.mla_layers): token rows [start, start+n) of one
        sequence from rows [R, latent_dim] (or [1, R, latent_dim]); only the first n (default R)
        rows are written. The pages must be allocated. Host (numpy) rows are padded to a
        power-of-two count and device rows keep their shape, so writes compile few programs."""
        b = self._get(seq_id)
        if isinstance(rows, np.ndarray) or not hasattr(rows, "devices"):
            rows = np.asarray(rows)
            if rows.ndim == 3 and rows.shape[0] == 1:
                rows = rows[0]
            n = rows.shape[0] if n is None else n
            if rows.ndim == 2:
                rows = np.pad(rows, ((0, _bucket(rows.shape[0]) - rows.shape[0]), (0, 0)))
        elif rows.ndim == 3 and rows.shape[0] == 1:
            rows = rows[0]
        width = int(rows.shape[0])
        n = width if n is None else int(n)
        if rows.ndim != 2 or rows.shape[1] != self.config.latent_dim or not 0 <= n <= width:
            raise JaxprfaasError(f"latent rows must be [>= {n}, {self.config.latent_dim}], got {list(rows.shape)}")
        if start < 0 or start + n > b.reserved_tokens:
            raise JaxprfaasError(f"sequence {seq_id}: rows [{start}, {start + n}) outside its "
                                 f"{b.reserved_tokens} reserved tokens")
        if n == 0:
            return
        pos = np.arange(start, start + width)
        table = np.asarray(b.pages, np.int32)
        pid = np.where(pos < start + n, table[np.minimum(pos // self.page_size, len(table) - 1)],
                       self.layout.num_pages)  # past the end: out of range, dropped by the scatter
        lat = list(self.arrays.latent)
        lat[mla_index] = _set_rows(lat[mla_index], jnp.asarray(pid, jnp.int32),
                                   jnp.asarray(pos % self.page_size, jnp.int32), jnp.asarray(rows))
        self.arrays = self.arrays.replace(latent=tuple(lat))

    def write_state(self, seq_id: str, state, row: int = 0, start: int = 0) -> None:
        """Every layer of row `row` of a HybridState: KDA arrays whole, MLA rows [start, length)."""
        n = int(np.asarray(state.lengths)[row])
        for i in range(len(self.config.kda_layers)):
            self.write_kda(seq_id, i, state.recurrent[i][row], state.conv[i][row])
        for j in range(len(self.config.mla_layers)):
            lat = state.latent[j][row]
            self.write_latent(seq_id, j, start, lat[start:] if start else lat, n - start)

    def read_state(self, seq_id: str, length: int):
        """The sequence's first `length` tokens of state as a one-sequence HybridState (tests, export)."""
        from jaxprfaas.model.state import HybridState
        b = self._get(seq_id)
        a = self.arrays
        table = jnp.asarray(b.pages, jnp.int32)
        lat = tuple(l[table].reshape(-1, l.shape[-1])[None, :length] for l in a.latent)
        return HybridState(tuple(r[b.slot][None] for r in a.recurrent), tuple(c[b.slot][None] for c in a.conv),
                           lat, jnp.asarray([length], jnp.int32))


def _one_row(x, shape: Sequence[int], what: str):
    x = jnp.asarray(x)
    if x.ndim == len(shape) + 1 and x.shape[0] == 1:
        x = x[0]
    if tuple(x.shape) != tuple(shape):
        raise JaxprfaasError(f"{what} must be {list(shape)}, got {list(x.shape)}")
    return x


def _bucket(n: int, floor: int = 16) -> int:
    """Row counts rounded up to a power of two, so writes compile a handful of programs."""
    return max(floor, 1 << math.ceil(math.log2(max(n, 1))))


@functools.partial(jax.jit, donate_argnums=(0, 1))
def _set_slot(rec_pool, conv_pool, slot, recurrent, conv):
    return (rec_pool.at[slot].set(recurrent.astype(rec_pool.dtype)),
            conv_pool.at[slot].set(conv.astype(conv_pool.dtype)))


@functools.partial(jax.jit, donate_argnums=(0,))
def _set_rows(lat, pid, off, rows):
    return lat.at[pid, off].set(rows.astype(lat.dtype), mode="drop")
