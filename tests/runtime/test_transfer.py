"""State transfer over real gRPC on loopback: exact round trips, faults, security, lifecycle.

Every test runs a real receiver (in this process or its own) and real senders; faults are real
too: a lossy emulated link, a TCP proxy that drops every connection, processes that get killed.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path

import grpc
import numpy as np
import pytest

from jaxprfaas.errors import ConfigError
from jaxprfaas.model.config import ModelConfig
from jaxprfaas.runtime import state_codec as codec
from jaxprfaas.runtime import transfer as T
from jaxprfaas.runtime.link import Link, egress_snapshot
from jaxprfaas.runtime.proto import transfer_pb2 as pb


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_jpf_rt_{name}", Path(__file__).with_name(f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_codec_tests = _load("test_state_codec")
random_state, assert_same_state = _codec_tests.random_state, _codec_tests.assert_same_state
certs = _load("certs")

MiB = 1 << 20


def small_config(dtype="bfloat16") -> ModelConfig:
    return ModelConfig.preset("tiny").replace(dtype=dtype, kda_head_dim=64, kda_num_heads=4,
                                              kv_lora_rank=480, qk_rope_head_dim=32)


@pytest.fixture
def receiver():
    servers = []

    def start(config, **kw):
        sink = kw.pop("sink", None) or T.InMemorySink(config, prefixes=kw.pop("prefixes", None))
        srv = T.serve_receiver(sink, config, **kw)
        servers.append(srv)
        return srv, sink

    yield start
    for s in servers:
        s.stop(0.2)


def spawn_receiver(config: ModelConfig, tmp_path: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    """A receiver in its own process; returns (process, target)."""
    cfg_file = tmp_path / "model.json"
    cfg_file.write_text(json.dumps(config.to_dict()))
    proc = subprocess.Popen([sys.executable, "-m", "jaxprfaas.runtime.transfer", "--model", str(cfg_file),
                             *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()  # "PORT n" once serving (the process exits on error)
    if not line.startswith("PORT"):
        proc.kill()
        raise RuntimeError(f"receiver did not start: {line!r} {proc.stderr.read()}")
    return proc, f"127.0.0.1:{line.split()[1]}"


# ---- round trips ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip_byte_exact_every_kind(receiver, dtype):
    cfg = small_config(dtype)
    srv, sink = receiver(cfg)
    state = random_state(cfg, [2500, 1700], seed=10)
    with T.StateSender(srv.target, cfg, streams=3, chunk_bytes=MiB) as sender:
        res = sender.send_state("rt", state)
    assert res.verified is True and res.resent == 0
    assert res.payload_bytes == sum(p.nbytes for p in codec.manifest(cfg, [2500, 1700]))
    got = sink.take("rt")
    assert_same_state(state, got)
    assert srv.receiver.state_of("rt") == T.S.ACKED
    assert sink.held_bytes == 0


def test_concurrent_transfers_share_one_sender(receiver):
    cfg = small_config()
    srv, sink = receiver(cfg)
    states = {f"c{i}": random_state(cfg, [400 * (i + 1)], seed=30 + i) for i in range(4)}
    with T.StateSender(srv.target, cfg, streams=3, chunk_bytes=MiB, link=Link(2e9, 0.002)) as sender:
        txs = {rid: sender.open(rid, [int(s.lengths[0])], verify=True) for rid, s in states.items()}
        for layer in range(cfg.num_hidden_layers):  # interleave the layers of all four requests
            for rid, tx in txs.items():
                tx.send_layer_of(states[rid], layer)
        results = {rid: tx.finish() for rid, tx in txs.items()}
    assert all(r.verified for r in results.values())
    for rid, state in states.items():
        assert_same_state(state, sink.take(rid))
    assert srv.receiver.active() == [] and sink.held_bytes == 0


def test_incremental_send_only_new_rows(receiver):
    cfg, held = small_config(), 1024
    state = random_state(cfg, [3000], seed=11)
    prefix = state.replace(latent=tuple(np.asarray(a)[:, :held].copy() for a in state.latent))
    srv, sink = receiver(cfg, prefixes={"blk:abc": prefix})
    with T.StateSender(srv.target, cfg, streams=2, chunk_bytes=MiB) as sender:
        full = sum(p.nbytes for p in codec.manifest(cfg, [3000]))
        res = sender.send_state("inc", state, prefix_rows=held, prefix_key="blk:abc")
    per_row = cfg.latent_dim * 2
    assert res.payload_bytes == full - held * per_row * len(cfg.mla_layers)
    assert srv.receiver.stats["bytes"] == res.payload_bytes
    assert_same_state(state, sink.take("inc"))


def test_layers_stream_while_later_layers_compute(receiver):
    """Layer i is on the wire (acked, even) before layer i+1 is handed over."""
    cfg = small_config()
    srv, sink = receiver(cfg)
    state = random_state(cfg, [4000], seed=12)
    acked_before = []
    with T.StateSender(srv.target, cfg, streams=2, chunk_bytes=MiB) as sender:
        tx = sender.open("pipe", [4000], verify=True)
        for layer in range(cfg.num_hidden_layers):
            tx.send_layer_of(state, layer)
            deadline = time.monotonic() + 5
            while tx.acked_chunks < sum(1 for r in tx.refs if r.piece.layer <= layer):
                assert time.monotonic() < deadline, "layer not acked while the next one 'computes'"
                time.sleep(0.005)
            acked_before.append(tx.acked_chunks)
        res = tx.finish()
    assert res.verified and acked_before[0] > 0 and acked_before == sorted(acked_before)
    assert tx.life.history == [T.S.PENDING, T.S.STREAMING, T.S.LANDED, T.S.ACKED]
    assert_same_state(state, sink.take("pipe"))


def test_explicit_commit_carries_annexes_and_waits_for_finish(receiver):
    """The request travels with Begin, the first sampled token with Commit; nothing is committed
    before the sender says so, even with every chunk in."""
    cfg = small_config()
    srv, sink = receiver(cfg)
    state = random_state(cfg, [1500], seed=24)
    with T.StateSender(srv.target, cfg, streams=2, chunk_bytes=MiB) as sender:
        tx = sender.open("ex", [1500], annex=b'{"prompt_len": 1500}', explicit_commit=True, verify=True)
        tx.send_state(state)
        _wait(lambda: tx.acked_chunks == len(tx.refs))
        time.sleep(0.1)
        assert srv.receiver.state_of("ex") == T.S.STREAMING and "ex" not in sink.states
        res = tx.finish(annex=b"first_token=42")
    assert res.verified and sink.annexes["ex"] == (b'{"prompt_len": 1500}', b"first_token=42")
    assert_same_state(state, sink.take("ex"))
    with T.StateSender(srv.target, cfg, streams=1) as sender:
        tx = sender.open("ex2", [10])
        tx.send_state(random_state(cfg, [10], seed=25))
        with pytest.raises(T.TransferError, match="needs open"):
            tx.finish(annex=b"x")
        tx.finish()


# ---- faults --------------------------------------------------------------------------------

def test_corrupted_chunk_detected_and_resent(receiver):
    cfg = small_config()
    srv, sink = receiver(cfg)
    state = random_state(cfg, [3000], seed=13)
    flips = Link(corrupt=lambda seq, attempt: seq in (1, 4) and attempt == 1)  # first try of two chunks
    with T.StateSender(srv.target, cfg, streams=2, chunk_bytes=MiB, link=flips) as sender:
        res = sender.send_state("crc", state)
    assert srv.receiver.stats["checksum_errors"] == 2
    assert res.resent == 2 and res.verified
    assert_same_state(state, sink.take("crc"))


def test_chunk_corrupted_every_time_fails_with_reason(receiver):
    cfg = small_config()
    srv, sink = receiver(cfg)
    state = random_state(cfg, [1000], seed=14)
    always = Link(corrupt=lambda seq, attempt: seq == 0)
    with T.StateSender(srv.target, cfg, streams=1, chunk_bytes=MiB, link=always, max_attempts=3) as sender:
        with pytest.raises(T.TransferFailed, match="chunk 0 .* failed its checksum 3 times"):
            sender.send_state("crc-bad", state)
    _wait(lambda: srv.receiver.state_of("crc-bad") == T.S.FAILED and sink.held_bytes == 0)


class _Proxy:
    """A TCP forwarder on loopback whose connections can all be cut at once (a flaky path)."""

    def __init__(self, target: str):
        host, port = target.rsplit(":", 1)
        self.dst = (host, int(port))
        self.ls = socket.create_server(("127.0.0.1", 0))
        self.port = self.ls.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                c, _ = self.ls.accept()
            except OSError:
                return
            u = socket.create_connection(self.dst, timeout=5)
            u.settimeout(None)
            with self.lock:
                self.conns += [c, u]
            for a, b in ((c, u), (u, c)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a, b):
        try:
            while data := a.recv(1 << 20):
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self):
        with self.lock:
            conns, self.conns = self.conns, []
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
                s.close()
            except OSError:
                pass

    def close(self):
        self.ls.close()
        self.cut()


def test_broken_connections_resume_after_last_acked(receiver):
    cfg = small_config()
    srv, sink = receiver(cfg)
    proxy = _Proxy(srv.target)
    state = random_state(cfg, [12000], seed=15)  # ~38 MiB of chunks over a 1 Gbit/s emulated link
    try:
        with T.StateSender(f"127.0.0.1:{proxy.port}", cfg, streams=2, chunk_bytes=MiB,
                           link=Link(1e9), deadline_s=20) as sender:
            tx = sender.open("resume", [12000], verify=True)
            tx.send_state(state)
            _wait(lambda: tx.acked_chunks >= len(tx.refs) // 3)
            proxy.cut()  # every connection drops mid-transfer
            res = tx.finish()
        assert res.verified
        assert 0 < res.resent < len(tx.refs) // 2  # only what was in flight went again
        assert srv.receiver.stats["resumed"] >= 1 and srv.receiver.stats["chunks"] == len(tx.refs)
        assert_same_state(state, sink.take("resume"))
    finally:
        proxy.close()


def _wait(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def test_receiver_killed_sender_fails_within_deadline_and_frees(tmp_path):
    cfg = small_config()
    proc, target = spawn_receiver(cfg, tmp_path)
    state = random_state(cfg, [16000], seed=16)  # ~50 MiB at 0.4 Gbit/s: ~1 s on the wire
    threads_before = threading.active_count()
    sender = T.StateSender(target, cfg, streams=2, chunk_bytes=MiB, link=Link(0.4e9), deadline_s=3.0)
    try:
        tx = sender.open("victim", [16000])
        arrays = {layer: codec.layer_arrays(cfg, state, layer) for layer in range(cfg.num_hidden_layers)}
        probe = weakref.ref(arrays[cfg.mla_layers[0]]["mla_latent"])
        for layer, a in arrays.items():
            tx.send_layer(layer, a)
        del arrays, a
        _wait(lambda: tx.acked_chunks > 0)
        proc.send_signal(signal.SIGKILL)
        proc.wait(5)
        with pytest.raises(T.TransferExpired, match="did not complete within its 3.0 s deadline.*UNAVAILABLE"):
            tx.finish()
        assert time.monotonic() - tx.started <= 3.0 + 1.0  # reported at its deadline (+ scheduling slack)
        assert tx.state == T.S.EXPIRED
        assert tx.join(5)  # threads, calls and the source arrays are released
        gc.collect()
        assert probe() is None, "sender still holds the state after the transfer failed"
        assert sender.active_transfers() == []
    finally:
        sender.close()
        if proc.poll() is None:
            proc.kill()
    _wait(lambda: threading.active_count() <= threads_before + 1)


SENDER_SCRIPT = """
import sys, numpy as np
sys.path.insert(0, {here!r})
from jaxprfaas.runtime import transfer as T, state_codec as codec
from jaxprfaas.runtime.link import Link
from jaxprfaas.model.config import ModelConfig
cfg = ModelConfig.preset("tiny").replace(dtype="bfloat16", kda_head_dim=64, kda_num_heads=4,
                                         kv_lora_rank=480, qk_rope_head_dim=32)
state = __import__("test_state_codec").random_state(cfg, [16000], seed=17)
s = T.StateSender({target!r}, cfg, streams=2, chunk_bytes=1 << 20, link=Link(0.2e9), lease_s=1.0)
tx = s.open("orphan", [16000])
tx.send_state(state)
print("SENDING", flush=True)
tx.finish()
"""


def test_sender_killed_receiver_frees_partial_state_at_lease_end(receiver, tmp_path):
    cfg = small_config()
    srv, sink = receiver(cfg, max_lease_s=1.0)
    script = SENDER_SCRIPT.format(here=str(Path(__file__).parent), target=srv.target)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        _wait(lambda: srv.receiver.stats["chunks"] > 2, timeout=30)
        assert sink.held_bytes > 0 and srv.receiver.active() == ["orphan"]
        proc.send_signal(signal.SIGKILL)  # the prefill pod vanishes mid-transfer
        proc.wait(5)
        t0 = time.monotonic()
        _wait(lambda: srv.receiver.active() == [], timeout=5)
        assert time.monotonic() - t0 < 1.0 + 1.0  # the 1 s lease, plus the reaper's tick and slack
        assert srv.receiver.state_of("orphan") == T.S.EXPIRED
        assert sink.held_bytes == 0 and "lease" in sink.aborted["orphan"]
    finally:
        if proc.poll() is None:
            proc.kill()


# ---- refusals ------------------------------------------------------------------------------

class _FullPool(T.InMemorySink):
    """A sink with no room, as a full cache pool answers."""

    def begin(self, request_id, meta):
        raise T.SinkFull(f"pool full: {meta.total_bytes} B needed, 0 B free")


def test_full_pool_refuses_at_once_with_reason(receiver):
    cfg = small_config()
    srv, sink = receiver(cfg, sink=_FullPool(cfg))
    with T.StateSender(srv.target, cfg, streams=2, deadline_s=10.0) as sender:
        tx = sender.open("no-room", [100])
        tx.send_state(random_state(cfg, [100], seed=23))
        with pytest.raises(T.TransferFailed, match="pool full: 312832 B needed"):
            tx.finish()
        assert tx.state == T.S.FAILED and time.monotonic() - tx.started < 5.0  # not at the deadline
    assert srv.receiver.state_of("no-room") == T.S.FAILED and srv.receiver.stats["chunks"] == 0


def test_wrong_model_fingerprint_refused_with_reason(receiver):
    cfg = small_config()
    srv, sink = receiver(cfg)
    other = cfg.replace(num_hidden_layers=8, mla_layers=(3, 7))
    with T.StateSender(srv.target, other, streams=1, chunk_bytes=MiB, deadline_s=5) as sender:
        with pytest.raises(T.TransferFailed, match="model fingerprint mismatch"):
            sender.send_state("alien", random_state(other, [10], seed=18))
    assert sink.held_bytes == 0


def test_wrong_protocol_version_refused_with_reason(receiver):
    cfg = small_config()
    srv, _ = receiver(cfg)
    ch = grpc.insecure_channel(srv.target)
    begin = ch.unary_unary(f"/{T.SERVICE}/Begin", request_serializer=pb.BeginRequest.SerializeToString,
                           response_deserializer=pb.BeginReply.FromString)
    with pytest.raises(grpc.RpcError) as e:
        begin(pb.BeginRequest(version=codec.PROTOCOL_VERSION + 1, fingerprint=cfg.fingerprint(),
                              request_id="v"), timeout=5)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "protocol version mismatch" in e.value.details()
    # a chunk of another version is nacked with the reason, whatever its transfer
    state = random_state(cfg, [8], seed=19)
    ref = codec.plan(codec.manifest(cfg, [8]))[0]
    frame = codec.encode_chunk(ref, codec.layer_arrays(cfg, state, ref.piece.layer)[ref.piece.kind],
                               request_id="v", fingerprint=cfg.fingerprint(), version=codec.PROTOCOL_VERSION + 1)
    push = ch.stream_stream(f"/{T.SERVICE}/Push", request_serializer=None, response_deserializer=pb.Ack.FromString)
    (ack,) = list(push(iter([frame]), timeout=5))
    assert ack.status == pb.VERSION_MISMATCH and "protocol version mismatch" in ack.message
    ch.close()


def test_bearer_token_required(receiver):
    cfg = small_config()
    srv, sink = receiver(cfg, tokens=["s3cret", "next-s3cret"])
    state = random_state(cfg, [100], seed=20)
    for token, why in ((None, "missing bearer token"), ("guess", "invalid bearer token")):
        with T.StateSender(srv.target, cfg, streams=1, token=token, deadline_s=5) as sender:
            with pytest.raises(T.TransferFailed, match=f"UNAUTHENTICATED.*{why}"):
                sender.send_state(f"tok-{token}", state)
    assert sink.held_bytes == 0 and srv.receiver.stats["chunks"] == 0
    with T.StateSender(srv.target, cfg, streams=1, token="next-s3cret") as sender:
        assert sender.send_state("tok-ok", state).verified


@pytest.mark.skipif(not certs.have_openssl(), reason="openssl CLI not found")
def test_mtls_accepts_our_ca_and_refuses_others(receiver, tmp_path):
    pki = certs.make_pki(tmp_path / "pki")
    cfg = small_config()
    srv, sink = receiver(cfg, address="127.0.0.1:0", tokens=["tkn"],
                         tls=T.TlsFiles(pki["server_cert"], pki["server_key"], ca=pki["ca"]))
    state = random_state(cfg, [300], seed=21)
    good = T.TlsFiles(pki["client_cert"], pki["client_key"], ca=pki["ca"])
    with T.StateSender(srv.target, cfg, streams=2, tls=good, token="tkn") as sender:
        assert sender.send_state("tls-ok", state).verified
    assert_same_state(state, sink.take("tls-ok"))
    bad = {"wrong client cert": T.TlsFiles(pki["rogue_cert"], pki["rogue_key"], ca=pki["ca"]),
           "no client cert": T.TlsFiles(ca=pki["ca"]),
           "server not trusted": T.TlsFiles(pki["client_cert"], pki["client_key"], ca=pki["rogue_ca"])}
    for name, tls in bad.items():
        with T.StateSender(srv.target, cfg, streams=1, tls=tls, token="tkn", deadline_s=1.5) as sender:
            with pytest.raises(T.TransferFailed, match="UNAVAILABLE"):
                sender.send_state(f"tls-{name}", state)
    assert srv.receiver.stats["chunks"] == len(codec.plan(codec.manifest(cfg, [300])))  # only the good one
    # plaintext against a TLS port gets nowhere either
    with T.StateSender(srv.target, cfg, streams=1, token="tkn", deadline_s=1.0) as sender:
        with pytest.raises(T.TransferFailed):
            sender.send_state("tls-plain", state)


def test_cross_datacenter_config_refuses_plaintext(tmp_path):
    plain = T.TransportSecurity.from_dict({})
    with pytest.raises(ConfigError, match="refusing to start in plaintext.*insecure: true"):
        T.check_transport_security(plain, cross_datacenter=True, link="prfaas->pd")
    T.check_transport_security(plain, cross_datacenter=False)  # loopback / same datacenter
    T.check_transport_security(T.TransportSecurity.from_dict({"insecure": True}), cross_datacenter=True)
    tok = tmp_path / "tokens"
    tok.write_text("a\nb\n")
    sec = T.TransportSecurity.from_dict({"tls": {"cert": "/nope.pem", "key": "k", "ca": "c"},
                                         "token_file": str(tok)})
    assert sec.tokens == ("a", "b")
    with pytest.raises(ConfigError, match="cert file /nope.pem does not exist"):
        T.check_transport_security(sec, cross_datacenter=True)
    with pytest.raises(ConfigError, match="unknown keys"):
        T.TransportSecurity.from_dict({"tsl": {}})
    with pytest.raises(ConfigError, match="insecure must be true or false"):
        T.TransportSecurity.from_dict({"insecure": "yes"})


# ---- lifecycle, metering, wire contract ------------------------------------------------------

def test_lifecycle_is_data_and_illegal_moves_raise():
    assert T.TERMINAL == {T.S.ACKED, T.S.FAILED, T.S.EXPIRED}
    assert T.LEGAL_TRANSITIONS[T.S.PENDING] >= {T.S.STREAMING}
    life = T._Lifecycle()
    with pytest.raises(T.TransferError, match="illegal transfer transition pending -> acked"):
        life.move(T.S.ACKED)
    life.move(T.S.STREAMING)
    life.move(T.S.EXPIRED)
    assert not life.move(T.S.FAILED)  # first terminal state wins
    assert life.history == [T.S.PENDING, T.S.STREAMING, T.S.EXPIRED]


def test_egress_meter_counts_wire_bytes(receiver):
    cfg = small_config()
    srv, _ = receiver(cfg)
    state = random_state(cfg, [2000], seed=22)
    with T.StateSender(srv.target, cfg, streams=2, link_name="test-egress-link") as sender:
        res = sender.send_state("meter", state)
        assert sender.meter.total_bytes == res.wire_bytes > res.payload_bytes
        assert sender.meter.bytes_per_s() * sender.meter.window_s == pytest.approx(res.wire_bytes, rel=0.01)
        assert egress_snapshot()["test-egress-link"] > 0


def test_committed_stubs_match_proto_and_skip_version_checks(tmp_path):
    pytest.importorskip("grpc_tools")
    from google.protobuf import descriptor_pb2
    from grpc_tools import protoc

    root = Path(__file__).resolve().parents[2]
    src = tmp_path / "jaxprfaas/runtime/proto"
    src.mkdir(parents=True)
    (src / "transfer.proto").write_text((root / "runtime/proto/transfer.proto").read_text())
    out = tmp_path / "set.pb"
    assert protoc.main(["protoc", f"-I{tmp_path}", f"--descriptor_set_out={out}",
                        str(src / "transfer.proto")]) == 0
    fresh = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    committed = descriptor_pb2.FileDescriptorProto.FromString(pb.DESCRIPTOR.serialized_pb)

    def strip_json_names(messages):  # descriptor sets carry json_name, embedded gencode does not
        for m in messages:
            for f in m.field:
                f.ClearField("json_name")
            strip_json_names(m.nested_type)

    strip_json_names(fresh.message_type)
    assert fresh == committed, "runtime/proto/transfer_pb2.py is stale: regenerate it (see transfer.proto)"
    assert "runtime_version" not in (root / "runtime/proto/transfer_pb2.py").read_text()
