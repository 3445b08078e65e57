"""fedavg-lora: FedAvg of the full fp32 LoRA state, the FlowerTune protocol (the baseline every method is measured
against). See docs/methods/fedavg-lora.md."""

from pollinate.methods import register_method

register_method("fedavg-lora", client="pollinate.methods.fedavg_lora.client",
                server="pollinate.methods.fedavg_lora.server", shared_sections=("lora",))
