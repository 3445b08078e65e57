"""The Flower ClientApp: reads the run config from the message and hands it to the method's client half."""

from __future__ import annotations

import logging
import warnings

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from pollinate.common.config import RunConfig
from pollinate.methods import get_method

app = ClientApp()


def client_half(method: str):
    return get_method(method).client_half()


def _run_config(msg: Message) -> RunConfig:
    return RunConfig.from_json(str(msg.content["config"]["run-config"]))


def _quiet_libraries() -> None:
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    for category in (DeprecationWarning, FutureWarning):  # library-internal chatter, nothing to act on
        warnings.filterwarnings("ignore", category=category)


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = _run_config(msg)
    _quiet_libraries()
    return Message(content=client_half(cfg.method).train(msg, cfg, context), reply_to=msg)


@app.train("prepare")
def prepare(msg: Message, context: Context) -> Message:
    """Round 0 of methods that need one (e.g. FedPipe: profile + importance scores before planning)."""
    cfg = _run_config(msg)
    _quiet_libraries()
    return Message(content=client_half(cfg.method).prepare(msg, cfg, context), reply_to=msg)
