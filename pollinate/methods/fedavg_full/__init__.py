"""fedavg-full: federated full fine-tuning, every fp32 weight both ways (SFPrompt's comparison).
See docs/methods/fedavg-full.md."""

from pollinate.methods import register_method

register_method("fedavg-full", client="pollinate.methods.fedavg_full.client",
                server="pollinate.methods.fedavg_full.server")
