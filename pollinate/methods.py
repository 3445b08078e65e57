"""The one registry of methods: name -> module name of its pair ``client/<module>.py`` + ``server/<module>.py``.

Modules are imported lazily by each side, so an edge client never imports server code and vice versa.
Adding a method: write the two modules, add its config section, add one line here.
"""

METHODS: dict[str, str] = {
    "fedavg-lora": "fedavg_lora",
    "fedpipe": "fedpipe",
    "sfprompt": "sfprompt",
    "fedavg-full": "fedavg_full",
}


def method_module(method: str) -> str:
    try:
        return METHODS[method]
    except KeyError:
        raise ValueError(f"unknown method {method!r}; expected one of {sorted(METHODS)}") from None
