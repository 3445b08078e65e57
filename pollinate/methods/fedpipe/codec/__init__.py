"""FedPipe's update codec: named tensors ↔ an ``UpdateBundle`` (``protos/update.proto``), each tensor dense
fp32/fp16, blockwise int8/NF4, top-k sparse or low-rank, chosen by name from the ``ENCODINGS`` table; error
feedback for the lossy ones. Decoding treats the payload as untrusted and raises only ``UpdateRejected``.
"""

from pollinate.common.checks import UpdateRejected
from pollinate.methods.fedpipe.codec.blockwise import NF4_CODEBOOK
from pollinate.methods.fedpipe.codec.bundle import (
    FORMAT_VERSION,
    MAX_DECODED_BYTES,
    DecodedBundle,
    decode_bundle,
    encode_bundle,
)
from pollinate.methods.fedpipe.codec.encodings import ENCODINGS, WIRE_BYTES_PER_PARAM
from pollinate.methods.fedpipe.codec.feedback import ErrorFeedback

__all__ = [
    "ENCODINGS",
    "FORMAT_VERSION",
    "MAX_DECODED_BYTES",
    "NF4_CODEBOOK",
    "WIRE_BYTES_PER_PARAM",
    "DecodedBundle",
    "ErrorFeedback",
    "UpdateRejected",
    "decode_bundle",
    "encode_bundle",
]
