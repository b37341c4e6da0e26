from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Sampling(_message.Message):
    __slots__ = ("max_tokens", "temperature", "top_k", "top_p", "seed", "stop_token_ids")
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    max_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., stop_token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("request_id", "token_ids", "sampling")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: Sampling
    def __init__(self, request_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[Sampling, _Mapping]] = ...) -> None: ...

class Summary(_message.Message):
    __slots__ = ("route", "reason", "ttft_s", "bytes_transferred", "prefill_s", "transfer_s", "total_s", "finish_reason", "prefill_node", "decode_node", "prompt_tokens", "uncached_tokens", "threshold")
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    TTFT_S_FIELD_NUMBER: _ClassVar[int]
    BYTES_TRANSFERRED_FIELD_NUMBER: _ClassVar[int]
    PREFILL_S_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_S_FIELD_NUMBER: _ClassVar[int]
    TOTAL_S_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    PREFILL_NODE_FIELD_NUMBER: _ClassVar[int]
    DECODE_NODE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    UNCACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    route: str
    reason: str
    ttft_s: float
    bytes_transferred: int
    prefill_s: float
    transfer_s: float
    total_s: float
    finish_reason: str
    prefill_node: int
    decode_node: int
    prompt_tokens: int
    uncached_tokens: int
    threshold: int
    def __init__(self, route: _Optional[str] = ..., reason: _Optional[str] = ..., ttft_s: _Optional[float] = ..., bytes_transferred: _Optional[int] = ..., prefill_s: _Optional[float] = ..., transfer_s: _Optional[float] = ..., total_s: _Optional[float] = ..., finish_reason: _Optional[str] = ..., prefill_node: _Optional[int] = ..., decode_node: _Optional[int] = ..., prompt_tokens: _Optional[int] = ..., uncached_tokens: _Optional[int] = ..., threshold: _Optional[int] = ...) -> None: ...

class GenerateEvent(_message.Message):
    __slots__ = ("token_ids", "finished", "summary")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    finished: bool
    summary: Summary
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., finished: bool = ..., summary: _Optional[_Union[Summary, _Mapping]] = ...) -> None: ...

class PrefillTask(_message.Message):
    __slots__ = ("request_id", "token_ids", "decode_target", "cross_datacenter", "sampling")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    DECODE_TARGET_FIELD_NUMBER: _ClassVar[int]
    CROSS_DATACENTER_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    decode_target: str
    cross_datacenter: bool
    sampling: Sampling
    def __init__(self, request_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., decode_target: _Optional[str] = ..., cross_datacenter: bool = ..., sampling: _Optional[_Union[Sampling, _Mapping]] = ...) -> None: ...

class PrefillResult(_message.Message):
    __slots__ = ("bytes", "prefill_s", "transfer_s", "tokens", "first_token", "has_first_token")
    BYTES_FIELD_NUMBER: _ClassVar[int]
    PREFILL_S_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_S_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    HAS_FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    bytes: int
    prefill_s: float
    transfer_s: float
    tokens: int
    first_token: int
    has_first_token: bool
    def __init__(self, bytes: _Optional[int] = ..., prefill_s: _Optional[float] = ..., transfer_s: _Optional[float] = ..., tokens: _Optional[int] = ..., first_token: _Optional[int] = ..., has_first_token: bool = ...) -> None: ...

class DecodeTask(_message.Message):
    __slots__ = ("request_id", "first_token", "prompt", "sampling", "state_timeout_s")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    STATE_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    first_token: int
    prompt: _containers.RepeatedScalarFieldContainer[int]
    sampling: Sampling
    state_timeout_s: float
    def __init__(self, request_id: _Optional[str] = ..., first_token: _Optional[int] = ..., prompt: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[Sampling, _Mapping]] = ..., state_timeout_s: _Optional[float] = ...) -> None: ...

class TokenEvent(_message.Message):
    __slots__ = ("token_ids", "finished", "finish_reason")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    finished: bool
    finish_reason: str
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., finished: bool = ..., finish_reason: _Optional[str] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatsReply(_message.Message):
    __slots__ = ("active", "waiting", "pool_free_bytes", "egress_bytes", "egress_bps", "busy_s")
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    POOL_FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    EGRESS_BYTES_FIELD_NUMBER: _ClassVar[int]
    EGRESS_BPS_FIELD_NUMBER: _ClassVar[int]
    BUSY_S_FIELD_NUMBER: _ClassVar[int]
    active: int
    waiting: int
    pool_free_bytes: int
    egress_bytes: int
    egress_bps: float
    busy_s: float
    def __init__(self, active: _Optional[int] = ..., waiting: _Optional[int] = ..., pool_free_bytes: _Optional[int] = ..., egress_bytes: _Optional[int] = ..., egress_bps: _Optional[float] = ..., busy_s: _Optional[float] = ...) -> None: ...
