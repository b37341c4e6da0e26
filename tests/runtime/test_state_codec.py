"""The wire framing of a HybridState: byte-exact round trips, checksums, version/model refusal."""

from __future__ import annotations

import numpy as np
import pytest

from jaxprfaas.model.config import ModelConfig
from jaxprfaas.runtime import state_codec as codec
from jaxprfaas.runtime.proto import transfer_pb2 as pb


def random_state(config: ModelConfig, lengths, seed: int, capacity: int | None = None):
    """A HybridState (numpy leaves) full of random bits of the right dtypes and shapes."""
    from jaxprfaas.model.state import HybridState

    rng = np.random.default_rng(seed)
    b, cap = len(lengths), capacity if capacity is not None else max(lengths)
    h, k, w = config.kda_num_heads, config.kda_head_dim, config.conv_kernel_size
    dt = codec.DTYPES[config.dtype]

    def bits(shape, dtype):  # random bit patterns, NaNs included: the codec must not care
        raw = rng.integers(0, 256, size=int(np.prod(shape)) * dtype.itemsize, dtype=np.uint8)
        return raw.view(dtype).reshape(shape)

    return HybridState(
        recurrent=tuple(bits((b, h, k, k), np.dtype(np.float32)) for _ in config.kda_layers),
        conv=tuple(bits((b, w - 1, 3 * h * k), dt) for _ in config.kda_layers),
        latent=tuple(bits((b, cap, config.latent_dim), dt) for _ in config.mla_layers),
        lengths=np.asarray(lengths, np.int32))


def assert_same_state(a, b, *, rows=None):
    for x, y in zip(a.recurrent + a.conv, b.recurrent + b.conv):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()
    for x, y in zip(a.latent, b.latent):
        n = rows if rows is not None else np.asarray(x).shape[1]
        assert x.dtype == y.dtype
        assert np.asarray(x)[:, :n].tobytes() == np.asarray(y)[:, :n].tobytes()
    assert np.asarray(a.lengths).tolist() == np.asarray(b.lengths).tolist()


# tiny config in both storage dtypes, with enough rows that MLA pieces cross chunk boundaries
@pytest.fixture(params=["float32", "bfloat16"])
def config(request):
    return ModelConfig.preset("tiny").replace(dtype=request.param, kda_head_dim=64, kda_num_heads=4,
                                              kv_lora_rank=480, qk_rope_head_dim=32)


def test_round_trip_every_kind_and_dtype_is_byte_exact(config):
    lengths = [3000, 2200]  # B=2 with different lengths; latent = 2 x 3000 x 512 x item
    state = random_state(config, lengths, seed=1)
    pieces, frames = codec.encode_state(config, state, "req-1", chunk_bytes=codec.MIN_CHUNK_BYTES)
    kinds = {p.kind for p in pieces}
    assert kinds == {"kda_state", "conv", "mla_latent"}
    assert len(frames) > len(pieces)  # at least one piece spans several chunks
    got = codec.decode_state(config, lengths, pieces, frames)
    assert_same_state(state, got)
    assert got.latent[0].dtype == codec.DTYPES[config.dtype]
    assert got.recurrent[0].dtype == np.float32


def test_frames_are_valid_protobuf_chunks(config):
    state = random_state(config, [50], seed=2)
    _, frames = codec.encode_state(config, state, "req-pb")
    chunk = pb.Chunk.FromString(frames[0])
    header, payload = codec.decode_frame(frames[0])
    assert chunk.header == header and chunk.payload == payload.tobytes()
    # a frame written by a stock protobuf encoder (other field order) decodes too
    other = (pb.Chunk(payload=chunk.payload).SerializeToString()
             + pb.Chunk(header=chunk.header).SerializeToString())  # protobuf merges concatenations
    h2, p2 = codec.decode_frame(other)
    assert h2 == header and p2.tobytes() == chunk.payload


def test_incremental_send_skips_held_rows_and_splices_prefix(config):
    lengths, held = [1500], 1024
    state = random_state(config, lengths, seed=3)
    pieces, frames = codec.encode_state(config, state, "req-inc", prefix_rows=held)
    full_pieces, full_frames = codec.encode_state(config, state, "req-full")
    per_row = config.latent_dim * codec.DTYPES[config.dtype].itemsize
    sent = sum(p.nbytes for p in pieces)
    assert sum(p.nbytes for p in full_pieces) - sent == held * per_row * len(config.mla_layers)
    mla = [p for p in pieces if p.kind == "mla_latent"]
    assert all(p.row_start == held and p.shape[1] == 1500 - held for p in mla)
    prefix = random_state(config, [held], seed=99)  # what the receiver holds ...
    prefix = prefix.replace(latent=tuple(np.asarray(a)[:, :held] for a in state.latent))  # ... the same rows
    got = codec.decode_state(config, lengths, pieces, frames, prefix=prefix)
    assert_same_state(state, got)
    with pytest.raises(codec.CodecError, match="prefix rows were not sent"):
        codec.decode_state(config, lengths, pieces, frames)


def test_corrupted_payload_is_detected(config):
    state = random_state(config, [64], seed=4)
    pieces, frames = codec.encode_state(config, state, "req-bad")
    bad = bytearray(frames[1])
    bad[-7] ^= 0x40
    header, payload = codec.decode_frame(bytes(bad))
    with pytest.raises(codec.ChecksumError, match="CRC-32C"):
        codec.verify_payload(header, payload)
    with pytest.raises(codec.ChecksumError):
        codec.decode_state(config, [64], pieces, [frames[0], bytes(bad)] + frames[2:])


def test_wrong_version_or_fingerprint_refused_with_reason(config):
    state = random_state(config, [8], seed=5)
    pieces = codec.manifest(config, [8])
    ref = codec.plan(pieces)[0]
    arr = codec.layer_arrays(config, state, ref.piece.layer)[ref.piece.kind]
    old = codec.encode_chunk(ref, arr, request_id="r", fingerprint=config.fingerprint(), version=99)
    with pytest.raises(codec.VersionMismatch, match="protocol version mismatch.*99"):
        codec.check_header(codec.decode_frame(old)[0], fingerprint=config.fingerprint())
    other = ModelConfig.preset("tiny").replace(num_hidden_layers=8)
    alien = codec.encode_chunk(ref, arr, request_id="r", fingerprint=other.fingerprint())
    with pytest.raises(codec.FingerprintMismatch, match="model fingerprint mismatch"):
        codec.check_header(codec.decode_frame(alien)[0], fingerprint=config.fingerprint())


def test_assembler_reports_each_piece_as_it_completes(config):
    state = random_state(config, [3000], seed=6)
    pieces, frames = codec.encode_state(config, state, "req-asm", chunk_bytes=codec.MIN_CHUNK_BYTES)
    asm = codec.StateAssembler(config, [3000], pieces)
    done = []
    for frame in reversed(frames):  # any order
        h, payload = codec.decode_frame(frame)
        if asm.write(h.seq, asm.piece_for(h), h.offset, payload):
            done.append(asm.piece_for(h).key)
    assert sorted(done) == sorted(p.key for p in pieces) and asm.complete
    h, payload = codec.decode_frame(frames[0])
    assert asm.write(h.seq, asm.piece_for(h), h.offset, payload) is False  # a duplicate changes nothing


def test_plan_and_manifest_shapes():
    cfg = ModelConfig.preset("kimi-linear-48b-a3b")
    pieces = codec.manifest(cfg, [4096])
    assert len(pieces) == 2 * len(cfg.kda_layers) + len(cfg.mla_layers)
    assert sum(p.nbytes for p in pieces) + 4 == __import__(
        "jaxprfaas.model.state", fromlist=["x"]).state_nbytes(cfg, 4096)
    refs = codec.plan(pieces, 4 << 20)
    assert [r.seq for r in refs] == list(range(len(refs)))
    assert all(r.length <= 4 << 20 for r in refs)
    assert sum(r.length for r in refs) == sum(p.nbytes for p in pieces)
    with pytest.raises(codec.CodecError, match="1-16 MiB"):
        codec.plan(pieces, 32 << 20)
    with pytest.raises(codec.CodecError, match="prefix_rows"):
        codec.manifest(cfg, [10], prefix_rows=11)


def test_array_not_matching_manifest_refused(config):
    p = codec.manifest(config, [4])[0]
    with pytest.raises(codec.CodecError, match="manifest says"):
        codec.check_array(p, np.zeros((1, 2, 3), np.float32))
