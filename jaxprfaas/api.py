"""The Python API: `LLM` (start a deployment and generate) and `Client` (talk to a running one).

    from jaxprfaas import LLM, SamplingParams
    with LLM("tiny", deployment="local-demo", threshold=64) as llm:
        outs = llm.generate([[1, 2, 3], list(range(3, 300))], SamplingParams(max_tokens=16))
        print(outs[1].route, outs[1].token_ids, outs[1].metrics["ttft_s"])

Both speak the router's gRPC `Frontend.Generate`; `LLM` owns the processes (closing it drains
and stops every one of them), `Client` owns nothing but channels.
"""

from __future__ import annotations

import dataclasses
import threading
from concurrent import futures
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterable, Sequence

import grpc

from jaxprfaas.errors import JaxprfaasError
from jaxprfaas.model.generate import SamplingParams
from jaxprfaas.runtime.proto import serving_pb2 as pb
from jaxprfaas.runtime.proto import serving_pb2_grpc as pbg

__all__ = ["LLM", "Client", "SamplingParams", "RequestOutput"]


@dataclasses.dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]           # generated tokens only
    route: str                     # "prfaas" | "local" | "rejected"
    finish_reason: str             # "stop" | "length" | "rejected" | ...
    metrics: dict[str, Any]        # ttft_s, bytes_transferred, prefill_s, transfer_s, total_s, reason, ...
    text: str | None = None        # the generated tokens decoded, when a tokenizer is configured


def _sampling_pb(p: SamplingParams) -> pb.Sampling:
    return pb.Sampling(max_tokens=p.max_tokens, temperature=p.temperature, top_k=p.top_k, top_p=p.top_p,
                       seed=p.seed, stop_token_ids=list(p.stop_token_ids))


def _output(request_id: str, prompt: list[int], tokens: list[int], s: pb.Summary) -> RequestOutput:
    metrics = {"ttft_s": s.ttft_s, "bytes_transferred": s.bytes_transferred, "prefill_s": s.prefill_s,
               "transfer_s": s.transfer_s, "total_s": s.total_s, "reason": s.reason,
               "prefill_node": s.prefill_node, "decode_node": s.decode_node,
               "uncached_tokens": s.uncached_tokens, "threshold": s.threshold}
    return RequestOutput(request_id, prompt, tokens, s.route, s.finish_reason, metrics)


def load_tokenizer(spec: str | Path):
    """A Hugging Face `tokenizer.json` (the file, or a directory holding it)."""
    from tokenizers import Tokenizer
    p = Path(spec)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise JaxprfaasError(f"no tokenizer at {p} (expected a tokenizer.json)")
    try:
        return Tokenizer.from_file(str(p))
    except Exception as e:  # tokenizers raises plain Exceptions
        raise JaxprfaasError(f"{p}: not a readable tokenizer.json ({e})") from None


def _prompt(p, tokenizer=None) -> list[int]:
    if isinstance(p, str):
        if tokenizer is None:
            raise JaxprfaasError("text prompts need a tokenizer, and none is configured: pass token ids "
                                 "or tokenizer=PATH/tokenizer.json")
        p = tokenizer.encode(p).ids
    ids = [int(t) for t in p]
    if not ids:
        raise JaxprfaasError("every prompt needs at least one token")
    return ids


class Client:
    """A connection to a running deployment's router (`host:port`)."""

    def __init__(self, address: str, *, timeout_s: float = 600.0, max_concurrency: int = 64,
                 tokenizer: str | Path | None = None):
        self.address, self.timeout_s = address, timeout_s
        self.tokenizer = load_tokenizer(tokenizer) if tokenizer is not None else None
        self._channel = grpc.insecure_channel(address)
        self._stub = pbg.FrontendStub(self._channel)
        self._pool = futures.ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="client")

    def _one(self, rid: str, prompt: list[int], params: SamplingParams,
             on_token: Callable[[str, list[int]], None] | None = None) -> RequestOutput:
        tokens: list[int] = []
        req = pb.GenerateRequest(request_id=rid, token_ids=prompt, sampling=_sampling_pb(params))
        try:
            for ev in self._stub.Generate(req, timeout=self.timeout_s):
                tokens += ev.token_ids
                if ev.token_ids and on_token is not None:
                    on_token(rid, list(ev.token_ids))
                if ev.finished:
                    out = _output(rid, prompt, tokens, ev.summary)
                    if self.tokenizer is not None:
                        out.text = self.tokenizer.decode(tokens)
                    return out
        except grpc.RpcError as e:
            raise JaxprfaasError(f"request {rid or '(unnamed)'} failed: {e.details()}") from None
        raise JaxprfaasError(f"request {rid}: the router closed the stream without a summary")

    def generate(self, prompts: Sequence, params: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
                 *, request_ids: Sequence[str] | None = None,
                 on_token: Callable[[str, list[int]], None] | None = None,
                 on_done: Callable[[RequestOutput], None] | None = None) -> list[RequestOutput]:
        """Send every prompt concurrently; returns outputs in prompt order."""
        prompts = [_prompt(p, self.tokenizer) for p in prompts]
        ps = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(ps) != len(prompts):
            raise JaxprfaasError(f"{len(prompts)} prompts but {len(ps)} sampling params")
        ids = list(request_ids) if request_ids is not None else [""] * len(prompts)

        def job(i):
            out = self._one(ids[i], prompts[i], ps[i], on_token)
            if on_done is not None:
                on_done(out)
            return out
        return list(self._pool.map(job, range(len(prompts))))

    async def stream(self, prompt, params: SamplingParams = SamplingParams(), request_id: str = "") -> AsyncIterator[int]:
        """`async for token in client.stream(prompt, params)`: tokens as the router sends them."""
        req = pb.GenerateRequest(request_id=request_id, token_ids=_prompt(prompt, self.tokenizer),
                                 sampling=_sampling_pb(params))
        async with grpc.aio.insecure_channel(self.address) as ch:
            try:
                async for ev in pbg.FrontendStub(ch).Generate(req, timeout=self.timeout_s):
                    for t in ev.token_ids:
                        yield t
            except grpc.RpcError as e:
                raise JaxprfaasError(f"request failed: {e.details()}") from None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_OVERRIDE_KEYS = {"threshold": "policy.threshold", "dtype": "dtype", "seed": "seed", "link_gbps": "link.gbps",
                  "latency_ms": "link.latency_ms", "streams": "link.streams", "controller": "policy.controller",
                  "tokenizer": "tokenizer"}


class LLM:
    """Start a deployment (a preset name, YAML path or dict) serving `model`, and generate through it."""

    def __init__(self, model: str = "tiny", deployment: str | dict = "local-demo", *, start_timeout_s: float = 300.0,
                 max_concurrency: int = 64, **overrides):
        from jaxprfaas.config import load_deployment
        from jaxprfaas.launcher import Deployment
        bad = set(overrides) - set(_OVERRIDE_KEYS)
        if bad:
            raise JaxprfaasError(f"unknown LLM option(s) {sorted(bad)}; known: {sorted(_OVERRIDE_KEYS)}")
        ov = {"model": str(model), **{_OVERRIDE_KEYS[k]: v for k, v in overrides.items()}}
        self.config = load_deployment(deployment, ov)
        self.deployment = Deployment(self.config).start(start_timeout_s)
        self.client = Client(self.deployment.address, max_concurrency=max_concurrency,
                             tokenizer=self.config.tokenizer)
        self._closed = threading.Event()

    @property
    def address(self) -> str:
        return self.deployment.address

    def generate(self, prompts: Iterable, params: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
                 **kw) -> list[RequestOutput]:
        if self._closed.is_set():
            raise JaxprfaasError("this LLM is closed")
        return self.client.generate(list(prompts), params, **kw)

    def close(self) -> None:
        if not self._closed.is_set():
            self._closed.set()
            self.client.close()
            self.deployment.stop()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
