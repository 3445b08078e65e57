"""The Flower ClientApp: reads the run config from the message and hands it to the method's client half.

A process that runs it imports the built-in methods (``pollinate.methods``) and the client halves named in
``POLLINATE_METHOD_MODULES`` (comma-separated): how a method registered from outside Pollinate reaches simulation
workers (``pollinate.simulations.run`` sets it).
"""

from __future__ import annotations

import importlib
import logging
import os
import warnings

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from pollinate.client.half import ClientHalf, EvaluatingClientHalf, PreparingClientHalf, checked_half
from pollinate.client.privacy import privatize_reply
from pollinate.client.run_end import note_run_end
from pollinate.client.secagg import secure_aggregation_mod
from pollinate.client.worker_link import forward_to_worker
from pollinate.common.config import RunConfig
from pollinate.common.lr_schedule import read_lr_scale, scaled_learning_rates
from pollinate.common.run_end import RUN_END_ACTION
from pollinate.methods import get_method

METHOD_MODULES_ENV = "POLLINATE_METHOD_MODULES"
for _module in filter(None, os.environ.get(METHOD_MODULES_ENV, "").split(",")):
    importlib.import_module(_module)  # importing a client half registers its method (its package's __init__)

# On a `pollinate join` node, train and evaluate messages go to its long-lived worker (client/worker_link.py),
# which runs this same app: forward_to_worker comes first, so every other mod (secure aggregation,
# client/secagg.py) runs once, in the worker, on the node state the worker hands back.
app = ClientApp(mods=[forward_to_worker, secure_aggregation_mod])


def client_half(method: str, *, prepare: bool = False) -> ClientHalf | PreparingClientHalf:
    """The method's client half, checked against the interface it must implement."""
    return checked_half(method, get_method(method).client_half(), prepare=prepare)


def _run_config(msg: Message) -> RunConfig:
    return RunConfig.from_json(str(msg.content["config"]["run-config"]))


def _quiet_libraries() -> None:
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    for category in (DeprecationWarning, FutureWarning):  # library-internal chatter, nothing to act on
        warnings.filterwarnings("ignore", category=category)


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = scaled_learning_rates(_run_config(msg), read_lr_scale(msg.content["config"]))  # the server's schedule
    _quiet_libraries()
    content = client_half(cfg.method).train(msg, cfg, context)
    return Message(content=privatize_reply(msg, content, cfg.federation.seed), reply_to=msg)  # local DP, if asked


@app.train("prepare")
def prepare(msg: Message, context: Context) -> Message:
    """Round 0 of methods that need one (e.g. FedPipe: profile + importance scores before planning)."""
    cfg = _run_config(msg)
    _quiet_libraries()
    return Message(content=client_half(cfg.method, prepare=True).prepare(msg, cfg, context), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Client-side evaluation of the global model on this client's held-out examples; a method whose client half
    has no ``evaluate`` answers that it evaluated nothing (``num-examples`` 0), which the server skips."""
    cfg = _run_config(msg)
    _quiet_libraries()
    half = client_half(cfg.method)
    if isinstance(half, EvaluatingClientHalf):
        return Message(content=half.evaluate(msg, cfg, context), reply_to=msg)
    return Message(content=RecordDict({"metrics": MetricRecord({"num-examples": 0})}), reply_to=msg)


# The coordinator's last message of a deployed run: tells `pollinate join` to exit (common/run_end.py).
app.query(RUN_END_ACTION)(note_run_end)
