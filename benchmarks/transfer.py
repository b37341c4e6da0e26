"""Cross-datacenter state transfer: throughput, link utilization, and bytes per request.

1. Unshaped loopback: `StateSender` -> a receiver process with 1, 2, 4, 8 streams, against the
   anchor measured in the same run: a raw TCP socket (one, then four connections) pushing the
   same bytes to a process that reads them into a preallocated buffer.
2. Shaped: 1 and 5 Gbit/s with 10 ms one-way latency, emulated on the sender (runtime/link.py);
   utilization as defined in runtime/link.py (ideal time of a perfect link / measured time),
   and plain achieved/link rate beside it.
3. Bytes on the wire per request at 4K/32K/128K tokens, from our own codec (manifest + frame
   headers): Kimi-Linear-48B-A3B (fp32 KDA state, bf16 MLA latent) vs a Llama-3-70B-shaped
   dense GQA cache (80 layers x 8 kv heads x 128 x {K,V} x 2 B per token) framed the same way.

    python benchmarks/transfer.py [--size-mib 256] [--repeat 5] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import socket
import statistics
import sys
import time

import numpy as np

from jaxprfaas.commands.bench import random_state, sized_config, transfer_bench
from jaxprfaas.model.config import ModelConfig
from jaxprfaas.runtime import state_codec as codec

MiB = 1 << 20


# ---- the anchor: raw TCP --------------------------------------------------------------------

def _sink(port_q: mp.Queue, total: int, conns: int) -> None:
    ls = socket.create_server(("127.0.0.1", 0))
    port_q.put(ls.getsockname()[1])
    buf = memoryview(bytearray(total))
    buf[:] = b"\0" * total  # touched once, like a preallocated pool
    while True:
        socks = [ls.accept()[0] for _ in range(conns)]
        share = total // conns
        for i, s in enumerate(socks):
            view, got = buf[i * share:(i + 1) * share if i < conns - 1 else total], 0
            while got < len(view):
                n = s.recv_into(view[got:])
                if not n:
                    return
                got += n
        for s in socks:
            s.sendall(b"k")
            s.close()


def raw_tcp(payload: bytes, conns: int, repeat: int) -> list[float]:
    """Seconds to push `payload` over `conns` loopback TCP connections to another process."""
    q = mp.Queue()
    proc = mp.Process(target=_sink, args=(q, len(payload), conns), daemon=True)
    proc.start()
    port = q.get(timeout=30)
    share = len(payload) // conns
    mv = memoryview(payload)
    out = []
    try:
        for _ in range(repeat + 1):  # the first is a warm-up
            socks = [socket.create_connection(("127.0.0.1", port), timeout=60) for _ in range(conns)]
            t0 = time.perf_counter()
            import threading

            def push(i, s):
                s.sendall(mv[i * share:(i + 1) * share if i < conns - 1 else len(payload)])
                s.recv(1)
            ts = [threading.Thread(target=push, args=(i, s)) for i, s in enumerate(socks)]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            out.append(time.perf_counter() - t0)
            for s in socks:
                s.close()
    finally:
        proc.kill()
    return out[1:]


def _bare_server(port_q: mp.Queue) -> None:
    import grpc
    from concurrent import futures

    def push(frames, ctx):
        for _ in frames:
            yield b"k"
    server = grpc.server(futures.ThreadPoolExecutor(32), options=[("grpc.max_receive_message_length", 64 * MiB)])
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "bare.Sink", {"Push": grpc.stream_stream_rpc_method_handler(push)})])
    port_q.put(server.add_insecure_port("127.0.0.1:0"))
    server.start()
    server.wait_for_termination()


def bare_grpc(total: int, chunk: int, streams: int, repeat: int, window: int = 4) -> list[float]:
    """Seconds to push `total` bytes as ready-made `chunk`-byte messages over `streams` gRPC
    streams (one connection each), one ack per message, `window` in flight: gRPC's own cost,
    without framing, checksums or copies into a sink."""
    import threading

    import grpc
    q = mp.Queue()
    proc = mp.Process(target=_bare_server, args=(q,), daemon=True)
    proc.start()
    port = q.get(timeout=30)
    msg = os.urandom(chunk)
    chans = [grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1), ("i", i)])
             for i in range(streams)]

    def run(ch, n):
        slots = threading.Semaphore(window)

        def gen():
            for _ in range(n):
                slots.acquire(timeout=30)
                yield msg
        for _ in ch.stream_stream("/bare.Sink/Push")(gen(), timeout=120):
            slots.release()
    out = []
    try:
        per = max(1, total // chunk // streams)
        for _ in range(repeat + 1):
            ts = [threading.Thread(target=run, args=(ch, per)) for ch in chans]
            t0 = time.perf_counter()
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            out.append((time.perf_counter() - t0) * total / (per * streams * chunk))
    finally:
        for ch in chans:
            ch.close()
        proc.kill()
    return out[1:]


# ---- bytes per request ------------------------------------------------------------------------

def llama3_70b_shaped() -> ModelConfig:
    """A dense GQA cache expressed as our codec's per-token rows: 80 layers whose row is
    K|V = 2 x 8 kv heads x 128 = 2048 values (latent_dim = kv_lora_rank + rope = 1984 + 64)."""
    return ModelConfig.preset("tiny").replace(
        num_hidden_layers=80, mla_layers=tuple(range(80)), kv_lora_rank=1984, qk_rope_head_dim=64,
        dtype="bfloat16", first_k_dense_replace=80)


def wire_bytes(config: ModelConfig, tokens: int, chunk_bytes: int = codec.DEFAULT_CHUNK_BYTES) -> tuple[int, int]:
    """(state payload bytes, bytes on the wire incl. frame headers) of one request."""
    pieces = codec.manifest(config, [tokens])
    refs = codec.plan(pieces, chunk_bytes)
    fp = config.fingerprint()
    wire = sum(codec.frame_size(r, request_id="req-0123456789abcdef", fingerprint=fp) for r in refs)
    return sum(p.nbytes for p in pieces), wire


# ---- main ---------------------------------------------------------------------------------------

def _versions() -> dict:
    import grpc
    import google.protobuf
    return {"python": platform.python_version(), "grpcio": grpc.__version__,
            "protobuf": google.protobuf.__version__, "numpy": np.__version__,
            "cpu": _cpu(), "cores": os.cpu_count()}


def _cpu() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=float, default=256)
    ap.add_argument("--shaped-mib", type=float, nargs=2, default=(64, 256), help="sizes at 1 and 5 Gbit/s")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--chunk-mib", type=float, default=codec.DEFAULT_CHUNK_BYTES / MiB)
    ap.add_argument("--out", help="write the results as JSON here too")
    args = ap.parse_args()
    res = {"versions": _versions(), "command": " ".join(["python", *sys.argv]),
           "loadavg_start": os.getloadavg()}

    # 1. unshaped: the same bytes over raw TCP, then through the transfer stack
    config, tokens = sized_config(ModelConfig.preset("kimi-linear-48b-a3b"), int(args.size_mib * MiB))
    state = random_state(config, tokens)
    payload = b"".join(np.ascontiguousarray(a).tobytes() for a in (*state.recurrent, *state.conv, *state.latent))
    res["bytes"] = len(payload)
    res["raw_tcp"] = {c: raw_tcp(payload, c, args.repeat) for c in (1, 4)}
    del payload
    res["bare_grpc"] = {c: bare_grpc(res["bytes"], int(args.chunk_mib * MiB), c, args.repeat) for c in (1, 4)}
    res["chunk_sweep"] = {}
    for mib in (1, 2, 4, 8, 16):
        r = transfer_bench(args.size_mib, 4, 0, 0, repeat=args.repeat, chunk_mib=mib)
        res["chunk_sweep"][mib] = r
        print(f"chunk {mib} MiB, 4 streams: {r['bytes'] / r['seconds'] / 1e9:.2f} GB/s (best)", flush=True)
    res["grpc"] = {}
    for s in (1, 2, 4, 8):
        r = transfer_bench(args.size_mib, s, 0, 0, repeat=args.repeat, chunk_mib=args.chunk_mib)
        res["grpc"][s] = r
        print(f"unshaped {s} streams: {r['bytes'] / r['seconds'] / 1e9:.2f} GB/s (best), verified={r['verified']}",
              flush=True)
    anchor = min(res["raw_tcp"][1])
    print(f"raw TCP 1 conn: {res['bytes'] / anchor / 1e9:.2f} GB/s; "
          f"4 conns: {res['bytes'] / min(res['raw_tcp'][4]) / 1e9:.2f} GB/s", flush=True)

    # 2. shaped links
    res["shaped"] = {}
    for gbps, mib in zip((1.0, 5.0), args.shaped_mib):
        for size in (32, mib):
            r = transfer_bench(size, 4, gbps, 10.0, repeat=args.repeat, chunk_mib=args.chunk_mib)
            res["shaped"][f"{gbps}@{size}"] = r
            print(f"{gbps} Gbit/s @ 10 ms, {size} MiB: utilization {r['utilization']:.3f}, "
                  f"achieved/link {r['gbps'] / gbps:.3f}", flush=True)

    # 3. bytes per request
    kimi, llama = ModelConfig.preset("kimi-linear-48b-a3b"), llama3_70b_shaped()
    res["per_request"] = {}
    for t in (4096, 32768, 131072):
        k, l_ = wire_bytes(kimi, t), wire_bytes(llama, t)
        res["per_request"][t] = {"kimi_state": k[0], "kimi_wire": k[1], "llama_state": l_[0], "llama_wire": l_[1]}
    res["loadavg_end"] = os.getloadavg()

    # report
    b = res["bytes"]
    print(f"\n{_versions()}\nload average {res['loadavg_start']} -> {res['loadavg_end']}\n")
    print("| path | streams | GB/s best | GB/s median | vs raw TCP (1 conn, best) | verified |")
    print("|---|---|---|---|---|---|")
    for c, ts in res["raw_tcp"].items():
        print(f"| raw TCP socket | {c} | {b / min(ts) / 1e9:.2f} | {b / statistics.median(ts) / 1e9:.2f} | "
              f"{anchor / min(ts):.2f} | - |")
    for c, ts in res["bare_grpc"].items():
        print(f"| bare gRPC, ready-made {args.chunk_mib:g} MiB messages | {c} | {b / min(ts) / 1e9:.2f} | "
              f"{b / statistics.median(ts) / 1e9:.2f} | {anchor / min(ts):.2f} | - |")
    for s, r in res["grpc"].items():
        print(f"| StateSender -> StateReceiver | {s} | {b / min(r['all_seconds']) / 1e9:.2f} | "
              f"{b / statistics.median(r['all_seconds']) / 1e9:.2f} | {anchor / min(r['all_seconds']):.2f} | "
              f"{r['verified']} |")
    print("\n| chunk (4 streams) | GB/s best | GB/s median |")
    print("|---|---|---|")
    for mib, r in res["chunk_sweep"].items():
        print(f"| {mib} MiB | {b / min(r['all_seconds']) / 1e9:.2f} | {b / statistics.median(r['all_seconds']) / 1e9:.2f} |")
    print("\n| link | state | seconds (best) | achieved Gbit/s | utilization | achieved/link |")
    print("|---|---|---|---|---|---|")
    for key, r in res["shaped"].items():
        print(f"| {r['link_gbps']:.0f} Gbit/s, 10 ms | {r['bytes'] / MiB:.0f} MiB | {r['seconds']:.3f} | "
              f"{r['gbps']:.2f} | {r['utilization']:.3f} | {r['gbps'] / r['link_gbps']:.3f} |")
    print("\n| tokens | Kimi-Linear-48B-A3B on the wire | Llama-3-70B-shaped GQA on the wire | ratio |")
    print("|---|---|---|---|")
    for t, r in res["per_request"].items():
        print(f"| {t} | {r['kimi_wire'] / MiB:,.1f} MiB ({r['kimi_wire']:,} B) | "
              f"{r['llama_wire'] / MiB:,.1f} MiB ({r['llama_wire']:,} B) | {r['llama_wire'] / r['kimi_wire']:.1f}x |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
