"""The registry of fine-tuning methods. A method is one package ``pollinate/methods/<name>/`` that registers itself.

A method's ``__init__`` calls ``register_method`` with its name, its config section (a dataclass, or ``None``)
and the module paths of its two halves. The halves are imported lazily, each by its own side, so an edge client
never imports server code and the coordinator never imports a client half.

Adding a method: write its folder (see ``docs/adding-a-method.md``) and import it at the bottom of this file, or
from your own code before building a config.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

from pollinate.common.config import CORE_CLIENT_SECTIONS, register_method_config


@dataclass(frozen=True)
class MethodSpec:
    """What the core needs to know of a method: where its halves live and which config sections they read."""

    name: str
    client: str
    server: str
    section: str | None = None
    shared_sections: tuple[str, ...] = ()

    @property
    def client_sections(self) -> tuple[str, ...]:
        """The config sections a client message carries: the core ones clients read, and this method's."""
        own = (self.section,) if self.section else ()
        return (*CORE_CLIENT_SECTIONS, *self.shared_sections, *own)

    def client_half(self) -> ModuleType:
        return importlib.import_module(self.client)

    def server_half(self) -> ModuleType:
        return importlib.import_module(self.server)


METHODS: dict[str, MethodSpec] = {}


def register_method(name: str, *, client: str, server: str, config: tuple[str, type] | None = None,
                    shared_sections: tuple[str, ...] = ()) -> MethodSpec:
    """Make ``name`` a method: ``client``/``server`` are module paths of its halves; ``config`` is
    ``(section name, dataclass)`` of its own config section; ``shared_sections`` are core sections beyond
    model/data/federation/train that its client half reads (e.g. ``("lora",)``)."""
    if name in METHODS:
        raise ValueError(f"method {name!r} is already registered (by {METHODS[name].server})")
    section, section_cls = config if config else (None, None)
    register_method_config(name, section, section_cls)
    spec = MethodSpec(name, client, server, section, tuple(shared_sections))
    METHODS[name] = spec
    return spec


def get_method(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; expected one of {sorted(METHODS)}") from None


# The built-in methods register themselves on import.
from pollinate.methods import fedavg_full, fedavg_lora, fedpipe, sfprompt  # noqa: E402, F401
