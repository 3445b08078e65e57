"""fedpipe: importance-selected, resource-planned LoRA on an NF4/int8 base, compressed deltas, exact
heterogeneous-rank aggregation. See docs/methods/fedpipe.md."""

from pollinate.methods import register_method
from pollinate.methods.fedpipe.config import FedPipeConfig

register_method("fedpipe", client="pollinate.methods.fedpipe.client", server="pollinate.methods.fedpipe.server",
                config=("fedpipe", FedPipeConfig), shared_sections=("lora",))
