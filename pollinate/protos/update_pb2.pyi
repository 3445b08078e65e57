from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Encoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ENCODING_UNSPECIFIED: _ClassVar[Encoding]
    ENCODING_DENSE_FP32: _ClassVar[Encoding]
    ENCODING_DENSE_FP16: _ClassVar[Encoding]
    ENCODING_INT8: _ClassVar[Encoding]
    ENCODING_NF4: _ClassVar[Encoding]
    ENCODING_TOPK: _ClassVar[Encoding]
    ENCODING_LOWRANK: _ClassVar[Encoding]

class FloatDtype(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FLOAT_DTYPE_UNSPECIFIED: _ClassVar[FloatDtype]
    FLOAT_DTYPE_FP32: _ClassVar[FloatDtype]
    FLOAT_DTYPE_FP16: _ClassVar[FloatDtype]

class BlockKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BLOCK_KIND_UNSPECIFIED: _ClassVar[BlockKind]
    BLOCK_KIND_INT8: _ClassVar[BlockKind]
    BLOCK_KIND_NF4: _ClassVar[BlockKind]
ENCODING_UNSPECIFIED: Encoding
ENCODING_DENSE_FP32: Encoding
ENCODING_DENSE_FP16: Encoding
ENCODING_INT8: Encoding
ENCODING_NF4: Encoding
ENCODING_TOPK: Encoding
ENCODING_LOWRANK: Encoding
FLOAT_DTYPE_UNSPECIFIED: FloatDtype
FLOAT_DTYPE_FP32: FloatDtype
FLOAT_DTYPE_FP16: FloatDtype
BLOCK_KIND_UNSPECIFIED: BlockKind
BLOCK_KIND_INT8: BlockKind
BLOCK_KIND_NF4: BlockKind

class Dense(_message.Message):
    __slots__ = ("dtype", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: FloatDtype
    data: bytes
    def __init__(self, dtype: _Optional[_Union[FloatDtype, str]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Blockwise(_message.Message):
    __slots__ = ("kind", "block_size", "scale_dtype", "scales", "codes")
    KIND_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    SCALE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    SCALES_FIELD_NUMBER: _ClassVar[int]
    CODES_FIELD_NUMBER: _ClassVar[int]
    kind: BlockKind
    block_size: int
    scale_dtype: FloatDtype
    scales: bytes
    codes: bytes
    def __init__(self, kind: _Optional[_Union[BlockKind, str]] = ..., block_size: _Optional[int] = ..., scale_dtype: _Optional[_Union[FloatDtype, str]] = ..., scales: _Optional[bytes] = ..., codes: _Optional[bytes] = ...) -> None: ...

class Sparse(_message.Message):
    __slots__ = ("indices", "value_dtype", "values", "numel")
    INDICES_FIELD_NUMBER: _ClassVar[int]
    VALUE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    NUMEL_FIELD_NUMBER: _ClassVar[int]
    indices: bytes
    value_dtype: FloatDtype
    values: bytes
    numel: int
    def __init__(self, indices: _Optional[bytes] = ..., value_dtype: _Optional[_Union[FloatDtype, str]] = ..., values: _Optional[bytes] = ..., numel: _Optional[int] = ...) -> None: ...

class LowRank(_message.Message):
    __slots__ = ("rank", "dtype", "u", "v")
    RANK_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    U_FIELD_NUMBER: _ClassVar[int]
    V_FIELD_NUMBER: _ClassVar[int]
    rank: int
    dtype: FloatDtype
    u: bytes
    v: bytes
    def __init__(self, rank: _Optional[int] = ..., dtype: _Optional[_Union[FloatDtype, str]] = ..., u: _Optional[bytes] = ..., v: _Optional[bytes] = ...) -> None: ...

class TensorUpdate(_message.Message):
    __slots__ = ("name", "shape", "original_dtype", "encoding", "dense", "blockwise", "sparse", "lowrank")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    ORIGINAL_DTYPE_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    DENSE_FIELD_NUMBER: _ClassVar[int]
    BLOCKWISE_FIELD_NUMBER: _ClassVar[int]
    SPARSE_FIELD_NUMBER: _ClassVar[int]
    LOWRANK_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    original_dtype: str
    encoding: Encoding
    dense: Dense
    blockwise: Blockwise
    sparse: Sparse
    lowrank: LowRank
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., original_dtype: _Optional[str] = ..., encoding: _Optional[_Union[Encoding, str]] = ..., dense: _Optional[_Union[Dense, _Mapping]] = ..., blockwise: _Optional[_Union[Blockwise, _Mapping]] = ..., sparse: _Optional[_Union[Sparse, _Mapping]] = ..., lowrank: _Optional[_Union[LowRank, _Mapping]] = ...) -> None: ...

class UpdateBundle(_message.Message):
    __slots__ = ("format_version", "base_version", "version", "sender", "round", "tensors")
    FORMAT_VERSION_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SENDER_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    format_version: int
    base_version: int
    version: int
    sender: str
    round: int
    tensors: _containers.RepeatedCompositeFieldContainer[TensorUpdate]
    def __init__(self, format_version: _Optional[int] = ..., base_version: _Optional[int] = ..., version: _Optional[int] = ..., sender: _Optional[str] = ..., round: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[TensorUpdate, _Mapping]]] = ...) -> None: ...
