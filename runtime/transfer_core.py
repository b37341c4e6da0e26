"""What both ends of a state transfer share: the lifecycle (`LEGAL_TRANSITIONS`), the errors,
the manifest (`TransferMeta`) and the sink protocol the decode side's storage implements
(`InMemorySink` for tests and the deployment; the cache pool's `PoolSink`).
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import threading
from typing import Mapping, Protocol

import numpy as np

from jaxprfaas.errors import JaxprfaasError
from jaxprfaas.model.config import ModelConfig
from jaxprfaas.runtime import state_codec as codec

SERVICE = "jaxprfaas.transfer.v1.StateReceiver"
MAX_FRAME_BYTES = codec.MAX_CHUNK_BYTES + (1 << 20)  # payload + header, with room to spare
_POLL_S = 0.05  # granularity of every bounded wait


# ---- lifecycle -----------------------------------------------------------------------------

class TransferState(str, enum.Enum):
    PENDING = "pending"      # opened, nothing accepted yet
    STREAMING = "streaming"  # receiver accepted the manifest; chunks moving
    LANDED = "landed"        # every chunk is on the receiver (not yet handed to its pool)
    ACKED = "acked"          # receiver committed the state: the sender may forget it
    FAILED = "failed"        # refused, aborted, or a chunk kept failing
    EXPIRED = "expired"      # sender's deadline or receiver's lease ran out


S = TransferState
LEGAL_TRANSITIONS: Mapping[TransferState, frozenset[TransferState]] = {
    S.PENDING: frozenset({S.STREAMING, S.FAILED, S.EXPIRED}),
    S.STREAMING: frozenset({S.LANDED, S.FAILED, S.EXPIRED}),
    S.LANDED: frozenset({S.ACKED, S.FAILED, S.EXPIRED}),
    S.ACKED: frozenset(),
    S.FAILED: frozenset(),
    S.EXPIRED: frozenset(),
}
TERMINAL = frozenset(s for s, nxt in LEGAL_TRANSITIONS.items() if not nxt)


class TransferError(JaxprfaasError):
    """A transfer could not be done; the message says which request, where, and why."""


class TransferFailed(TransferError):
    pass


class TransferExpired(TransferFailed):
    pass


class SinkFull(TransferError):
    """The sink cannot hold this state now (the pool is full): the sender may retry later."""


class _Lifecycle:
    def __init__(self) -> None:
        self.state = S.PENDING
        self.history = [S.PENDING]
        self.cond = threading.Condition()

    def move(self, new: TransferState) -> bool:
        """Move to `new`; False if already terminal (first terminal state wins)."""
        with self.cond:
            if self.state in TERMINAL:
                return False
            if new not in LEGAL_TRANSITIONS[self.state]:
                raise TransferError(f"illegal transfer transition {self.state.value} -> {new.value}")
            self.state = new
            self.history.append(new)
            self.cond.notify_all()
            return True


# ---- the sink the cache pool implements -------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TransferMeta:
    request_id: str
    lengths: tuple[int, ...]          # HybridState.lengths
    pieces: tuple[codec.Piece, ...]   # manifest, in layer order
    prefix_rows: int                  # MLA rows the receiver already holds (not sent)
    prefix_key: str                   # how the sink finds those rows (opaque here)
    num_chunks: int
    want_digest: bool = False         # the sender asked for codec.digest of the pieces at commit
    annex: bytes = b""                # opaque sender data for the sink (e.g. the serialized request)
    explicit_commit: bool = False     # commit on the sender's Commit (with its annex), not the last chunk

    @property
    def total_bytes(self) -> int:
        return sum(p.nbytes for p in self.pieces)


class StateSink(Protocol):
    """Where arriving state goes. The cache pool implements this; calls may come from many threads."""

    def begin(self, request_id: str, meta: TransferMeta) -> None:
        """Reserve room for the whole manifest (raise SinkFull to refuse); called again on resume."""

    def write(self, request_id: str, seq: int, piece: codec.Piece, offset: int, payload: memoryview) -> None:
        """Copy a verified chunk into place; `payload` is only valid during the call. Idempotent per seq."""

    def commit(self, request_id: str, annex: bytes) -> int | None:
        """All bytes are in: make the state visible to decode. `annex`: what the sender's Commit
        carried (e.g. the first sampled token; b"" on an automatic commit). Return codec.digest of
        the pieces (in manifest order) if meta.want_digest, else None."""

    def abort(self, request_id: str, reason: str) -> None:
        """Free everything held for this request (idempotent; unknown ids are fine)."""


class InMemorySink:
    """A StateSink assembling HybridStates in host memory (tests, benchmarks, until the pool lands).

    `keep=False` drops each state once committed (after its digest) and, like a real pool,
    reuses the freed buffers for later transfers: on a VM, first-touching fresh pages costs
    more than the network does.
    """

    def __init__(self, config: ModelConfig, prefixes: Mapping[str, object] | None = None, keep: bool = True):
        self.config, self.prefixes, self.keep = config, dict(prefixes or {}), keep
        self.partial: dict[str, codec.StateAssembler] = {}
        self.metas: dict[str, TransferMeta] = {}
        self.states: dict[str, object] = {}
        self.aborted: dict[str, str] = {}
        self.annexes: dict[str, tuple[bytes, bytes]] = {}  # request id -> (Begin's, Commit's)
        self._free: dict[int, list[np.ndarray]] = collections.defaultdict(list)
        self._lock = threading.Lock()

    def _alloc(self, nbytes: int) -> np.ndarray:
        free = self._free.get(nbytes)
        return free.pop() if free else np.empty(nbytes, np.uint8)

    def _recycle(self, asm: codec.StateAssembler) -> None:
        if len(self._free) < 64:
            for buf in asm.buffers.values():
                self._free[buf.nbytes].append(buf)

    @property
    def held_bytes(self) -> int:
        """Bytes of half-received states (what a leak would show up in)."""
        with self._lock:
            return sum(a.nbytes for a in self.partial.values())

    def begin(self, request_id: str, meta: TransferMeta) -> None:
        if meta.prefix_rows and meta.prefix_key not in self.prefixes:
            raise codec.CodecError(f"prefix {meta.prefix_key!r} ({meta.prefix_rows} rows) is not held here")
        with self._lock:
            if request_id not in self.partial:
                self.partial[request_id] = codec.StateAssembler(self.config, meta.lengths, meta.pieces,
                                                                alloc=None if self.keep else self._alloc)
                self.metas[request_id] = meta

    def write(self, request_id, seq, piece, offset, payload) -> None:
        with self._lock:
            asm = self.partial.get(request_id)
        if asm is not None:  # the copy runs outside the lock: streams write in parallel
            asm.write(seq, piece, offset, payload)

    def commit(self, request_id: str, annex: bytes = b"") -> int | None:
        with self._lock:
            asm = self.partial.pop(request_id)
            meta = self.metas.pop(request_id)
            self.annexes[request_id] = (meta.annex, annex)
        value = asm.digest() if meta.want_digest else None
        if self.keep:
            self.states[request_id] = asm.state(self.prefixes.get(meta.prefix_key))
        else:
            with self._lock:
                self._recycle(asm)
        return value

    def abort(self, request_id: str, reason: str) -> None:
        with self._lock:
            asm = self.partial.pop(request_id, None)
            self.metas.pop(request_id, None)
            self.aborted[request_id] = reason
            if asm is not None and not self.keep:
                self._recycle(asm)

    def take(self, request_id: str):
        return self.states.pop(request_id)
