"""sfprompt: U-shaped split learning with soft prompts and EL2N data pruning. See docs/methods/sfprompt.md."""

from pollinate.methods import register_method
from pollinate.methods.sfprompt.config import SFPromptConfig

register_method("sfprompt", client="pollinate.methods.sfprompt.client", server="pollinate.methods.sfprompt.server",
                config=("sfprompt", SFPromptConfig))
