"""Global KV index: which cluster/node holds which token-block prefix (paper §3.2, §6).

A prompt is cut into fixed-size token blocks; block i's key is a rolling hash of block i's
tokens and block i-1's key, so equal keys mean equal whole prefixes (Mooncake's prefix hashing).
Engines publish `add` / `evict` events; the router asks `longest_match` for the reusable prefix
per cluster and per node.

Hybrid models add one rule: a prefix is usable only up to a block boundary where the node also
holds the KDA state snapshot (linear states are reusable only at an exact length), so each
entry records whether that node has the state at the end of that block.

Thread-safe: one lock guards the maps; readers get plain copies. It never evicts on its own;
capacity policy belongs to the cache pool that sends the events.
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
from collections import defaultdict
from typing import Iterable, Sequence

import numpy as np

Location = tuple[str, int]  # (cluster, node)


def block_hashes(tokens: Sequence[int] | np.ndarray, block_size: int, seed: bytes = b"") -> list[bytes]:
    """Rolling 64-bit block keys of the whole blocks of `tokens` (a partial tail is not keyed)."""
    arr = np.ascontiguousarray(np.asarray(tokens, dtype=np.int64))
    out, prev = [], seed
    for i in range(arr.size // block_size):
        h = hashlib.blake2b(prev, digest_size=8)
        h.update(arr[i * block_size:(i + 1) * block_size].tobytes())
        prev = h.digest()
        out.append(prev)
    return out


@dataclasses.dataclass(frozen=True)
class Match:
    """Longest usable prefix: `blocks` whole blocks, i.e. `tokens` tokens, at `location`."""

    location: Location
    blocks: int
    tokens: int


class KVIndex:
    def __init__(self, block_size: int = 512):
        if block_size < 1:
            raise ValueError("block_size must be >= 1")
        self.block_size = block_size
        self._lock = threading.Lock()
        # block key -> {location: has KDA state snapshot at this block's end}
        self._where: dict[bytes, dict[Location, bool]] = {}
        self._count: dict[Location, int] = defaultdict(int)

    # -- events ------------------------------------------------------------------------------
    def add(self, cluster: str, node: int, keys: Iterable, state_every: int = 1) -> None:
        """`node` of `cluster` now holds these consecutive blocks; it has a KDA state snapshot
        at every `state_every`-th block boundary and at the last block (0: only the last)."""
        keys = list(keys)
        loc = (cluster, node)
        with self._lock:
            for i, k in enumerate(keys):
                has_state = (i == len(keys) - 1) or (state_every > 0 and (i + 1) % state_every == 0)
                entry = self._where.setdefault(k, {})
                if loc not in entry:
                    self._count[loc] += 1
                entry[loc] = entry.get(loc, False) or has_state

    def evict(self, cluster: str, node: int, keys: Iterable) -> None:
        loc = (cluster, node)
        with self._lock:
            for k in keys:
                entry = self._where.get(k)
                if entry is not None and entry.pop(loc, None) is not None:
                    self._count[loc] -= 1
                    if not entry:
                        del self._where[k]

    def drop_node(self, cluster: str, node: int) -> None:
        """Forget everything a node held (it failed or changed role)."""
        loc = (cluster, node)
        with self._lock:
            for k in [k for k, e in self._where.items() if loc in e]:
                e = self._where[k]
                del e[loc]
                if not e:
                    del self._where[k]
            self._count.pop(loc, None)

    # -- queries -----------------------------------------------------------------------------
    def longest_match(self, keys: Sequence) -> dict[Location, Match]:
        """Per location, the longest usable prefix of `keys` (contiguous from block 0 and ending
        where that location has a KDA state). Locations with no usable prefix are absent."""
        out: dict[Location, Match] = {}
        with self._lock:
            alive: set[Location] | None = None
            for i, k in enumerate(keys):
                entry = self._where.get(k)
                if not entry:
                    break
                alive = set(entry) if alive is None else alive & entry.keys()
                if not alive:
                    break
                for loc in alive:
                    if entry[loc]:
                        out[loc] = Match(loc, i + 1, (i + 1) * self.block_size)
        return out

    def best_per_cluster(self, keys: Sequence) -> dict[str, Match]:
        best: dict[str, Match] = {}
        for loc, m in self.longest_match(keys).items():
            if loc[0] not in best or m.blocks > best[loc[0]].blocks:
                best[loc[0]] = m
        return best

    def blocks_held(self, cluster: str, node: int) -> int:
        with self._lock:
            return self._count.get((cluster, node), 0)

    def __len__(self) -> int:
        with self._lock:
            return len(self._where)
