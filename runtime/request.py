"""Value objects shared by the engines: a request, the events it streams, why it finished.

A `Request` is what a client asked for (prompt token ids + `SamplingParams`); the engines keep
their own mutable bookkeeping beside it and never change it. `TokenEvent` is the one thing that
leaves an engine per generated token, whether through an iterator or a callback.
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
from typing import Callable, Sequence

import numpy as np

from jaxprfaas.errors import JaxprfaasError
from jaxprfaas.model.generate import SamplingParams

_ids = itertools.count()


class FinishReason(str, enum.Enum):
    STOP = "stop"            # emitted one of stop_token_ids
    LENGTH = "length"        # reached max_tokens (or the engine's max_model_len)
    CANCELLED = "cancelled"  # cancel() was called
    ERROR = "error"          # the engine refused it (message in TokenEvent.error)


@dataclasses.dataclass(frozen=True)
class Request:
    prompt: tuple[int, ...]                      # prompt token ids (at least one)
    params: SamplingParams = SamplingParams()    # sampling and stopping rules
    request_id: str = ""                         # unique per engine; generated when empty
    on_token: Callable[["TokenEvent"], None] | None = dataclasses.field(default=None, compare=False)

    def __post_init__(self):
        if not self.request_id:
            object.__setattr__(self, "request_id", f"req-{next(_ids)}")
        prompt = tuple(int(t) for t in np.asarray(self.prompt, dtype=np.int64).reshape(-1))
        if not prompt:
            raise JaxprfaasError(f"request {self.request_id}: the prompt needs at least one token")
        object.__setattr__(self, "prompt", prompt)
        if not isinstance(self.params, SamplingParams):
            raise JaxprfaasError(f"request {self.request_id}: params must be a SamplingParams")

    @property
    def prompt_len(self) -> int:
        return len(self.prompt)

    def check_vocab(self, vocab_size: int) -> None:
        lo, hi = min(self.prompt), max(self.prompt)
        if lo < 0 or hi >= vocab_size:
            raise JaxprfaasError(f"request {self.request_id}: token ids must be in [0, {vocab_size}), "
                                 f"got min {lo} max {hi}")


@dataclasses.dataclass(frozen=True)
class TokenEvent:
    request_id: str
    token: int | None                   # None only on a finish without a token (cancel, error)
    index: int                          # 0-based index of the token among the generated ones
    finished: FinishReason | None = None
    error: str = ""


def finish_reason(params: SamplingParams, token: int, n_generated: int) -> FinishReason | None:
    """Why a sequence ends after emitting `token` as its `n_generated`-th token (1-based), or None."""
    if token in params.stop_token_ids:
        return FinishReason.STOP
    if n_generated >= params.max_tokens:
        return FinishReason.LENGTH
    return None


def as_requests(prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams]
                ) -> list[Request]:
    ps = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
    if len(ps) != len(prompts):
        raise JaxprfaasError(f"{len(prompts)} prompts but {len(ps)} sampling params")
    return [Request(tuple(p), sp, request_id=f"req-{i}") for i, (p, sp) in enumerate(zip(prompts, ps))]
