from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KIND_UNSPECIFIED: _ClassVar[Kind]
    KDA_STATE: _ClassVar[Kind]
    CONV: _ClassVar[Kind]
    MLA_LATENT: _ClassVar[Kind]

class Status(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OK: _ClassVar[Status]
    CHECKSUM_MISMATCH: _ClassVar[Status]
    VERSION_MISMATCH: _ClassVar[Status]
    FINGERPRINT_MISMATCH: _ClassVar[Status]
    UNKNOWN_TRANSFER: _ClassVar[Status]
    BAD_CHUNK: _ClassVar[Status]
    CLOSED: _ClassVar[Status]
KIND_UNSPECIFIED: Kind
KDA_STATE: Kind
CONV: Kind
MLA_LATENT: Kind
OK: Status
CHECKSUM_MISMATCH: Status
VERSION_MISMATCH: Status
FINGERPRINT_MISMATCH: Status
UNKNOWN_TRANSFER: Status
BAD_CHUNK: Status
CLOSED: Status

class ArraySpec(_message.Message):
    __slots__ = ("layer", "kind", "dtype", "shape", "row_start")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    ROW_START_FIELD_NUMBER: _ClassVar[int]
    layer: int
    kind: Kind
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    row_start: int
    def __init__(self, layer: _Optional[int] = ..., kind: _Optional[_Union[Kind, str]] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., row_start: _Optional[int] = ...) -> None: ...

class ChunkHeader(_message.Message):
    __slots__ = ("version", "fingerprint", "request_id", "seq", "array", "offset", "length", "crc32c")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    ARRAY_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    CRC32C_FIELD_NUMBER: _ClassVar[int]
    version: int
    fingerprint: str
    request_id: str
    seq: int
    array: ArraySpec
    offset: int
    length: int
    crc32c: int
    def __init__(self, version: _Optional[int] = ..., fingerprint: _Optional[str] = ..., request_id: _Optional[str] = ..., seq: _Optional[int] = ..., array: _Optional[_Union[ArraySpec, _Mapping]] = ..., offset: _Optional[int] = ..., length: _Optional[int] = ..., crc32c: _Optional[int] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("header", "payload")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    header: ChunkHeader
    payload: bytes
    def __init__(self, header: _Optional[_Union[ChunkHeader, _Mapping]] = ..., payload: _Optional[bytes] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("seq", "status", "message", "committed", "digest", "has_digest")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    HAS_DIGEST_FIELD_NUMBER: _ClassVar[int]
    seq: int
    status: Status
    message: str
    committed: bool
    digest: int
    has_digest: bool
    def __init__(self, seq: _Optional[int] = ..., status: _Optional[_Union[Status, str]] = ..., message: _Optional[str] = ..., committed: bool = ..., digest: _Optional[int] = ..., has_digest: bool = ...) -> None: ...

class BeginRequest(_message.Message):
    __slots__ = ("version", "fingerprint", "request_id", "batch", "lengths", "prefix_rows", "prefix_key", "arrays", "num_chunks", "lease_ms", "want_digest", "annex", "explicit_commit")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    LENGTHS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_ROWS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_KEY_FIELD_NUMBER: _ClassVar[int]
    ARRAYS_FIELD_NUMBER: _ClassVar[int]
    NUM_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    LEASE_MS_FIELD_NUMBER: _ClassVar[int]
    WANT_DIGEST_FIELD_NUMBER: _ClassVar[int]
    ANNEX_FIELD_NUMBER: _ClassVar[int]
    EXPLICIT_COMMIT_FIELD_NUMBER: _ClassVar[int]
    version: int
    fingerprint: str
    request_id: str
    batch: int
    lengths: _containers.RepeatedScalarFieldContainer[int]
    prefix_rows: int
    prefix_key: str
    arrays: _containers.RepeatedCompositeFieldContainer[ArraySpec]
    num_chunks: int
    lease_ms: int
    want_digest: bool
    annex: bytes
    explicit_commit: bool
    def __init__(self, version: _Optional[int] = ..., fingerprint: _Optional[str] = ..., request_id: _Optional[str] = ..., batch: _Optional[int] = ..., lengths: _Optional[_Iterable[int]] = ..., prefix_rows: _Optional[int] = ..., prefix_key: _Optional[str] = ..., arrays: _Optional[_Iterable[_Union[ArraySpec, _Mapping]]] = ..., num_chunks: _Optional[int] = ..., lease_ms: _Optional[int] = ..., want_digest: bool = ..., annex: _Optional[bytes] = ..., explicit_commit: bool = ...) -> None: ...

class BeginReply(_message.Message):
    __slots__ = ("received", "lease_ms", "committed", "digest", "has_digest")
    RECEIVED_FIELD_NUMBER: _ClassVar[int]
    LEASE_MS_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    HAS_DIGEST_FIELD_NUMBER: _ClassVar[int]
    received: _containers.RepeatedScalarFieldContainer[int]
    lease_ms: int
    committed: bool
    digest: int
    has_digest: bool
    def __init__(self, received: _Optional[_Iterable[int]] = ..., lease_ms: _Optional[int] = ..., committed: bool = ..., digest: _Optional[int] = ..., has_digest: bool = ...) -> None: ...

class CommitRequest(_message.Message):
    __slots__ = ("request_id", "num_chunks", "total_bytes", "annex")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    ANNEX_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    num_chunks: int
    total_bytes: int
    annex: bytes
    def __init__(self, request_id: _Optional[str] = ..., num_chunks: _Optional[int] = ..., total_bytes: _Optional[int] = ..., annex: _Optional[bytes] = ...) -> None: ...

class CommitReply(_message.Message):
    __slots__ = ("digest", "has_digest")
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    HAS_DIGEST_FIELD_NUMBER: _ClassVar[int]
    digest: int
    has_digest: bool
    def __init__(self, digest: _Optional[int] = ..., has_digest: bool = ...) -> None: ...

class RenewRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class RenewReply(_message.Message):
    __slots__ = ("lease_ms",)
    LEASE_MS_FIELD_NUMBER: _ClassVar[int]
    lease_ms: int
    def __init__(self, lease_ms: _Optional[int] = ...) -> None: ...

class AbortRequest(_message.Message):
    __slots__ = ("request_id", "reason")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    reason: str
    def __init__(self, request_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class AbortReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
