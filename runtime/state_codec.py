"""Wire framing of a `HybridState`: pieces, chunks, checksums, and reassembly.

A state travels as *pieces* (one array each: a KDA layer's recurrent state, its conv tail, or
the MLA latent rows the receiver does not already hold), cut into *chunks* of a few MiB. Every
chunk carries a self-describing header (protocol version, model fingerprint, request id, seq,
layer, kind, dtype, shape, byte range) and a CRC-32C of its payload, so a receiver can place
and verify it without any other context than the transfer's manifest.

A frame on the wire is a valid protobuf `Chunk` (`proto/transfer.proto`), but this module
writes and reads its two fields by hand: the payload goes from the source array into the frame
in one copy and is read back as a view, never through a protobuf bytes field.

Sequence numbers follow from the manifest alone (`plan`), so both ends agree on what chunk n
is before any byte moves. Nothing here knows about gRPC, threads or deadlines.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from typing import Callable, Iterable, Sequence

import crc32c
import ml_dtypes
import numpy as np

from jaxprfaas.errors import JaxprfaasError
from jaxprfaas.model.config import ModelConfig
from jaxprfaas.runtime.proto import transfer_pb2 as pb

PROTOCOL_VERSION = 1
# 2 MiB. Measured 1-16 MiB (benchmarks/RESULTS.md, "Transfer"): on the shared 2-core VM 16 MiB
# was clearly slowest and 1-8 MiB were within run-to-run noise of each other; 2 MiB keeps a
# stream's window (4 chunks) at 8 MiB and a layer's first chunk on the wire early, and halves
# the per-message overhead of 1 MiB.
DEFAULT_CHUNK_BYTES = 2 << 20
MIN_CHUNK_BYTES = 1 << 20
MAX_CHUNK_BYTES = 16 << 20

KINDS = ("kda_state", "conv", "mla_latent")
_KIND_PB = {"kda_state": pb.KDA_STATE, "conv": pb.CONV, "mla_latent": pb.MLA_LATENT}
_PB_KIND = {v: k for k, v in _KIND_PB.items()}
DTYPES = {
    "float32": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
}


class CodecError(JaxprfaasError):
    """A frame or a state cannot be encoded or decoded as asked."""


class ChecksumError(CodecError):
    """A payload's CRC-32C does not match its header: corrupted in transit, resend it."""


class VersionMismatch(CodecError):
    """The peer speaks another protocol version."""


class FingerprintMismatch(CodecError):
    """The peer serves a different model (config fingerprints differ)."""


@dataclasses.dataclass(frozen=True)
class Piece:
    """One array that travels: a whole KDA array, or MLA latent rows [row_start, row_start+shape[1])."""

    layer: int               # model layer index (ModelConfig numbering)
    kind: str                # "kda_state" | "conv" | "mla_latent"
    dtype: str               # key of DTYPES
    shape: tuple[int, ...]   # shape of the travelling array (C order)
    row_start: int = 0       # MLA latent: first token row of this piece; 0 otherwise

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype].itemsize

    @property
    def key(self) -> tuple[int, str]:
        return (self.layer, self.kind)

    def to_pb(self) -> pb.ArraySpec:
        return pb.ArraySpec(layer=self.layer, kind=_KIND_PB[self.kind], dtype=self.dtype,
                            shape=list(self.shape), row_start=self.row_start)

    @staticmethod
    def from_pb(spec: pb.ArraySpec) -> "Piece":
        if spec.kind not in _PB_KIND:
            raise CodecError(f"unknown array kind {spec.kind}")
        if spec.dtype not in DTYPES:
            raise CodecError(f"unsupported dtype {spec.dtype!r}; known: {', '.join(DTYPES)}")
        return Piece(int(spec.layer), _PB_KIND[spec.kind], spec.dtype,
                     tuple(int(d) for d in spec.shape), int(spec.row_start))


@dataclasses.dataclass(frozen=True)
class ChunkRef:
    """Where chunk `seq`'s bytes lie: a byte range of one piece. Holds no data."""

    seq: int
    piece: Piece
    offset: int
    length: int


# ---- manifest and plan ---------------------------------------------------------------------

def manifest(config: ModelConfig, lengths: Sequence[int], prefix_rows: int = 0) -> tuple[Piece, ...]:
    """Every piece of a state with these `lengths`, in layer order, skipping `prefix_rows` MLA rows.

    The MLA latent travels at capacity max(lengths) (the trimmed state); KDA arrays are whole
    because a linear state has no prefix to share.
    """
    batch = len(lengths)
    cap = max(lengths) if batch else 0
    if not 0 <= prefix_rows <= cap:
        raise CodecError(f"prefix_rows={prefix_rows} outside 0..{cap} (the longest sequence)")
    h, k, w = config.kda_num_heads, config.kda_head_dim, config.conv_kernel_size
    out = []
    for layer in range(config.num_hidden_layers):
        if config.is_mla(layer):
            out.append(Piece(layer, "mla_latent", config.dtype,
                             (batch, cap - prefix_rows, config.latent_dim), prefix_rows))
        else:
            out.append(Piece(layer, "kda_state", "float32", (batch, h, k, k)))
            out.append(Piece(layer, "conv", config.dtype, (batch, w - 1, 3 * h * k)))
    return tuple(out)


def check_chunk_bytes(chunk_bytes: int) -> int:
    if not MIN_CHUNK_BYTES <= chunk_bytes <= MAX_CHUNK_BYTES:
        raise CodecError(f"chunk size {chunk_bytes} B outside {MIN_CHUNK_BYTES}..{MAX_CHUNK_BYTES} B (1-16 MiB)")
    return chunk_bytes


def plan(pieces: Sequence[Piece], chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> tuple[ChunkRef, ...]:
    """Cut pieces into chunks of at most `chunk_bytes`; seqs are consecutive in manifest order."""
    check_chunk_bytes(chunk_bytes)
    refs, seq = [], 0
    for p in pieces:
        for off in range(0, p.nbytes, chunk_bytes):
            refs.append(ChunkRef(seq, p, off, min(chunk_bytes, p.nbytes - off)))
            seq += 1
    return tuple(refs)


def layer_arrays(config: ModelConfig, state, layer: int, prefix_rows: int = 0) -> dict[str, np.ndarray]:
    """The arrays of model layer `layer` of a HybridState, as C-contiguous numpy (the sender's input)."""
    if config.is_mla(layer):
        j = config.mla_layers.index(layer)
        cap = int(np.max(np.asarray(state.lengths))) if len(state.lengths) else 0
        return {"mla_latent": np.ascontiguousarray(np.asarray(state.latent[j])[:, prefix_rows:cap])}
    i = config.kda_layers.index(layer)
    return {"kda_state": np.ascontiguousarray(np.asarray(state.recurrent[i])),
            "conv": np.ascontiguousarray(np.asarray(state.conv[i]))}


def check_array(piece: Piece, array: np.ndarray) -> np.ndarray:
    """The array as a contiguous buffer, refusing one that does not match its manifest entry."""
    if array.dtype != DTYPES[piece.dtype] or tuple(array.shape) != piece.shape:
        raise CodecError(f"layer {piece.layer} {piece.kind}: got {array.dtype}{list(array.shape)}, "
                         f"manifest says {piece.dtype}{list(piece.shape)}")
    return np.ascontiguousarray(array)


# ---- frames --------------------------------------------------------------------------------

def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _read_varint(buf: memoryview, i: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        if i >= len(buf) or shift > 63:
            raise CodecError("truncated frame")
        b = buf[i]
        i += 1
        n |= (b & 0x7F) << shift
        if not b & 0x80:
            return n, i
        shift += 7


def payload_view(array: np.ndarray, ref: ChunkRef) -> memoryview:
    return memoryview(array.reshape(-1).view(np.uint8))[ref.offset:ref.offset + ref.length]


def encode_chunk(ref: ChunkRef, array: np.ndarray, *, request_id: str, fingerprint: str,
                 crc: int | None = None, version: int = PROTOCOL_VERSION) -> bytes:
    """The frame of chunk `ref` cut from `array` (its piece's data); one copy of the payload."""
    payload = payload_view(array, ref)
    header = pb.ChunkHeader(
        version=version, fingerprint=fingerprint, request_id=request_id, seq=ref.seq,
        array=ref.piece.to_pb(), offset=ref.offset, length=ref.length,
        crc32c=crc32c.crc32c(payload) if crc is None else crc,
    ).SerializeToString()
    # Chunk{header=1 (tag 0x0a), payload=2 (tag 0x12)}: a valid protobuf message.
    return b"".join((b"\x0a", _varint(len(header)), header, b"\x12", _varint(ref.length), payload))


def frame_size(ref: ChunkRef, *, request_id: str, fingerprint: str) -> int:
    """Bytes of chunk `ref`'s frame on the wire, header included, computed without any data
    (exact but for the CRC's varint, taken at its widest: at most 4 B per chunk over)."""
    header = pb.ChunkHeader(version=PROTOCOL_VERSION, fingerprint=fingerprint, request_id=request_id,
                            seq=ref.seq, array=ref.piece.to_pb(), offset=ref.offset, length=ref.length,
                            crc32c=0xFFFFFFFF).ByteSize()
    return 2 + len(_varint(header)) + header + len(_varint(ref.length)) + ref.length


def decode_frame(frame: bytes) -> tuple[pb.ChunkHeader, memoryview]:
    """Header and payload view of a frame; falls back to a full parse for other field layouts."""
    buf = memoryview(frame)
    try:
        if buf[0] != 0x0A:
            raise CodecError("layout")
        n, i = _read_varint(buf, 1)
        header = pb.ChunkHeader.FromString(buf[i:i + n])
        i += n
        if i == len(buf):
            return header, buf[i:i]
        if buf[i] != 0x12:
            raise CodecError("layout")
        m, j = _read_varint(buf, i + 1)
        if j + m != len(buf):
            raise CodecError("layout")
        return header, buf[j:]
    except Exception:  # not our own layout (or garbage): let protobuf decide
        try:
            chunk = pb.Chunk.FromString(bytes(frame))
        except Exception as e:
            raise CodecError(f"undecodable chunk frame ({len(frame)} B): {e}") from None
        return chunk.header, memoryview(chunk.payload)


def check_header(header: pb.ChunkHeader, *, fingerprint: str) -> None:
    """Refuse a chunk from another protocol version or model, saying which."""
    if header.version != PROTOCOL_VERSION:
        raise VersionMismatch(f"protocol version mismatch: chunk speaks version {header.version}, "
                              f"this receiver speaks version {PROTOCOL_VERSION}")
    if header.fingerprint != fingerprint:
        raise FingerprintMismatch(f"model fingerprint mismatch: chunk is from model {header.fingerprint!r}, "
                                  f"this receiver serves model {fingerprint!r}")


def verify_payload(header: pb.ChunkHeader, payload: memoryview) -> None:
    if len(payload) != header.length:
        raise ChecksumError(f"chunk {header.seq}: {len(payload)} payload bytes, header says {header.length}")
    got = crc32c.crc32c(payload)
    if got != header.crc32c:
        raise ChecksumError(f"chunk {header.seq}: CRC-32C {got:#010x} != header {header.crc32c:#010x}")


def digest(arrays: Iterable[np.ndarray | memoryview]) -> int:
    """CRC-32C over the given buffers in order (the end-to-end check of a whole transfer)."""
    value = 0
    for a in arrays:
        buf = a if isinstance(a, memoryview) else memoryview(np.ascontiguousarray(a).reshape(-1).view(np.uint8))
        value = crc32c.crc32c(buf, value=value)
    return value


# ---- reassembly ----------------------------------------------------------------------------

class StateAssembler:
    """Receiver-side buffers of one transfer: places verified chunks, tells when all bytes are in.

    Bytes are counted per seq, so a chunk delivered twice (a resend after a lost ack) is
    harmless. `state()` builds the HybridState, splicing in the MLA prefix rows the receiver held.
    """

    def __init__(self, config: ModelConfig, lengths: Sequence[int], pieces: Sequence[Piece],
                 alloc: Callable[[int], np.ndarray] | None = None):
        """`alloc(nbytes)` -> uint8 buffer: where piece buffers come from (default: fresh memory)."""
        self.config, self.lengths, self.pieces = config, tuple(int(x) for x in lengths), tuple(pieces)
        self._index = {p.key: p for p in self.pieces}
        if len(self._index) != len(self.pieces):
            raise CodecError("manifest lists an array twice")
        alloc = alloc or (lambda n: np.empty(n, np.uint8))
        self.buffers = {p.key: alloc(p.nbytes) for p in self.pieces}
        self.total_bytes = sum(p.nbytes for p in self.pieces)
        self.received_bytes = 0
        self.received: set[int] = set()
        self.piece_bytes = {p.key: 0 for p in self.pieces}
        self._lock = threading.Lock()  # bookkeeping only: copies of different chunks run in parallel

    @property
    def nbytes(self) -> int:
        return self.total_bytes

    @property
    def complete(self) -> bool:
        return self.received_bytes == self.total_bytes

    def piece_for(self, header: pb.ChunkHeader) -> Piece:
        p = Piece.from_pb(header.array)
        want = self._index.get(p.key)
        if want != p or header.offset + header.length > p.nbytes:
            raise CodecError(f"chunk {header.seq}: layer {p.layer} {p.kind} {p.dtype}{list(p.shape)} "
                             f"bytes {header.offset}+{header.length} not in the manifest "
                             f"({want.dtype}{list(want.shape)} row_start {want.row_start})" if want else
                             f"chunk {header.seq}: layer {p.layer} {p.kind} is not in the manifest")
        return p

    def write(self, seq: int, piece: Piece, offset: int, payload: memoryview) -> bool:
        """Place a chunk; True when this write completed its piece (a pool can move that layer
        to the device now, while later layers are still on the wire)."""
        self.buffers[piece.key][offset:offset + len(payload)] = np.frombuffer(payload, np.uint8)
        with self._lock:
            if seq in self.received:
                return False
            self.received.add(seq)
            self.received_bytes += len(payload)
            self.piece_bytes[piece.key] += len(payload)
            return self.piece_bytes[piece.key] == piece.nbytes

    def array(self, piece: Piece) -> np.ndarray:
        return self.buffers[piece.key].view(DTYPES[piece.dtype]).reshape(piece.shape)

    def digest(self) -> int:
        return digest(self.buffers[p.key] for p in self.pieces)

    def state(self, prefix=None):
        """The assembled HybridState (numpy leaves). `prefix`: a state holding the skipped MLA rows."""
        from jaxprfaas.model.state import HybridState  # needs JAX; the codec itself does not

        cfg = self.config
        rec, conv, lat = [], [], []
        for layer in range(cfg.num_hidden_layers):
            if cfg.is_mla(layer):
                p = self._index[(layer, "mla_latent")]
                rows = self.array(p)
                if p.row_start:
                    if prefix is None:
                        raise CodecError(f"layer {layer}: {p.row_start} prefix rows were not sent "
                                         "and no prefix state was given")
                    head = np.asarray(prefix.latent[cfg.mla_layers.index(layer)])[:, :p.row_start]
                    if head.shape[1] != p.row_start:
                        raise CodecError(f"layer {layer}: prefix holds {head.shape[1]} rows, "
                                         f"need {p.row_start}")
                    rows = np.concatenate([head.astype(rows.dtype), rows], axis=1)
                lat.append(rows)
            else:
                rec.append(self.array(self._index[(layer, "kda_state")]))
                conv.append(self.array(self._index[(layer, "conv")]))
        return HybridState(recurrent=tuple(rec), conv=tuple(conv), latent=tuple(lat),
                           lengths=np.asarray(self.lengths, np.int32))


# ---- whole states (tests, tools) -------------------------------------------------------------

def encode_state(config: ModelConfig, state, request_id: str, *, prefix_rows: int = 0,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> tuple[tuple[Piece, ...], list[bytes]]:
    """(manifest, frames) of a whole state, without any transport."""
    lengths = [int(x) for x in np.asarray(state.lengths)]
    pieces = manifest(config, lengths, prefix_rows)
    arrays = {}
    for layer in range(config.num_hidden_layers):
        for kind, a in layer_arrays(config, state, layer, prefix_rows).items():
            arrays[(layer, kind)] = check_array(next(p for p in pieces if p.key == (layer, kind)), a)
    fp = config.fingerprint()
    frames = [encode_chunk(r, arrays[r.piece.key], request_id=request_id, fingerprint=fp)
              for r in plan(pieces, chunk_bytes)]
    return pieces, frames


def decode_state(config: ModelConfig, lengths: Sequence[int], pieces: Sequence[Piece],
                 frames: Iterable[bytes], prefix=None):
    """Verify and place every frame, then build the HybridState; raises on any bad or missing chunk."""
    asm = StateAssembler(config, lengths, pieces)
    fp = config.fingerprint()
    for frame in frames:
        header, payload = decode_frame(frame)
        check_header(header, fingerprint=fp)
        verify_payload(header, payload)
        asm.write(header.seq, asm.piece_for(header), header.offset, payload)
    if not asm.complete:
        raise CodecError(f"incomplete state: {asm.received_bytes} of {asm.total_bytes} bytes")
    return asm.state(prefix)
