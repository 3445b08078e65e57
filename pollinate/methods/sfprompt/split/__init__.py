"""U-shaped split of Hugging Face models (head on the client | body on the server | tail on the client).

``base`` holds the parts and the table of architectures, ``prompt`` the soft prompts, ``llama`` and ``bert`` the
architectures (imported here so that they register), ``tensors`` the wire format of the tensors that cross the cut,
``prompted`` the split model behind a Hugging Face-style forward and ``generate`` (what evaluation calls).
"""

from pollinate.methods.sfprompt.split import bert, llama  # noqa: F401  (register their architectures)
from pollinate.methods.sfprompt.split.base import (
    HeadOutput,
    SplitArchitecture,
    SplitParts,
    TailOutput,
    register_split_architecture,
    set_split_trainable,
    split_architecture_for,
    split_model,
    unsplit_forward,
)
from pollinate.methods.sfprompt.split.prompt import PromptInit, SoftPrompt
from pollinate.methods.sfprompt.split.prompted import BodyFn, PromptedSplitModel
from pollinate.methods.sfprompt.split.tensors import (
    WIRE_DTYPES,
    TensorDecodeError,
    WireDType,
    declared_dtype,
    decode_tensor,
    encode_tensor,
)

__all__ = [
    "WIRE_DTYPES", "BodyFn", "HeadOutput", "PromptInit", "PromptedSplitModel", "SoftPrompt", "SplitArchitecture",
    "SplitParts", "TailOutput", "TensorDecodeError", "WireDType", "declared_dtype", "decode_tensor", "encode_tensor",
    "register_split_architecture", "set_split_trainable", "split_architecture_for", "split_model", "unsplit_forward",
]
