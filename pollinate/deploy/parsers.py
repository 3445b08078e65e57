"""Argument parsers of `pollinate join` and `pollinate keys` (the commands' bodies are in deploy/commands.py)."""

from __future__ import annotations

import argparse


def add_join_parser(sub: argparse._SubParsersAction) -> None:
    """`pollinate join`: a client joins a coordinator and trains on its local data."""
    join = sub.add_parser("join", help="join a coordinator as a client, training on local data (Flower SuperNode)")
    join.add_argument("--coordinator", required=True, metavar="HOST:PORT", help="address the coordinator printed")
    join.add_argument("--data", required=True, metavar="PATH",
                      help="this client's data: a .jsonl/.csv file or saved dataset dir (all of it is used)")
    join.add_argument("--profile", metavar="TOML", help="edge resource profile (memory, compute, bandwidth)")
    join.add_argument("--certs", metavar="DIR_OR_FILE",
                      help="the coordinator's ca.crt, or a directory holding it")
    join.add_argument("--key", metavar="KEYFILE", help="this node's private key (`pollinate keys node`; if encrypted, "
                                                       "its passphrase in POLLINATE_KEY_PASSPHRASE)")
    join.add_argument("--insecure", action="store_true", help="plain HTTP, only against an --insecure coordinator")
    join.add_argument("--partition-id", type=int, metavar="N",
                      help="this client's id in [0, federation.clients) (the coordinator prints one per key)")
    join.add_argument("--work-dir", metavar="DIR", help="logs and Flower state (default ./pollinate-node-<id>)")
    join.add_argument("--retry-budget", type=float, default=300.0, metavar="SECONDS",
                      help="give up when the coordinator has not accepted this node for this long (default 300)")
    join.add_argument("--no-worker", action="store_true",
                      help="run each message in its own ClientApp process (reloading the model every round) "
                           "instead of one long-lived worker")


def add_keys_parser(sub: argparse._SubParsersAction) -> None:
    """`pollinate keys init|node`: the coordinator's TLS certificates and the clients' key pairs."""
    keys = sub.add_parser(
        "keys", help="create TLS certificates and client keys for deployment",
        description="Create TLS certificates and client keys. With POLLINATE_KEY_PASSPHRASE set, ca.key and node "
                    "private keys are written encrypted with it (`pollinate join` reads them with the same "
                    "variable); server.key stays unencrypted for the services that load it at start.")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    init = keys_sub.add_parser("init", help="a private CA and the coordinator's server certificate")
    init.add_argument("dir", help="output directory (ca.crt, ca.key, server.crt, server.key)")
    init.add_argument("--host", action="append", required=True, metavar="NAME",
                      help="DNS name or IP clients use to reach the coordinator; repeatable")
    init.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    init.add_argument("--overwrite", action="store_true", help="replace existing files")
    node = keys_sub.add_parser("node", help="a client's authentication key pair (NAME and NAME.pub)")
    node.add_argument("dir", help="output directory")
    node.add_argument("name", help="node name (file name of the key pair)")
    node.add_argument("--overwrite", action="store_true", help="replace existing files")
