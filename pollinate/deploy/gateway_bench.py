"""What the Fleet gateway adds: round time of a loopback deployment with and without it, and its per-request cost.

`python -m pollinate.deploy.gateway_bench --payload-mb 2 50 --rounds 6 --repeats 2` runs, for each payload, a
TLS + node-auth coordinator and one joined node that echoes an ArrayRecord of that size every round, once with
the node dialling the public gateway and once dialling the SuperLink's loopback port directly (alternating,
`repeats` times each), and prints the ServerApp's round times (round 1, which fetches the app and starts the
ClientApp process, is left out). `--forward-mb` also times single Fleet-sized requests (request and answer of that
size, as Flower's 5 MiB object chunks) against a stand-in SuperLink, direct vs through the gateway, both TLS.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import uvicorn
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from pollinate.deploy.coordinator import Coordinator, CoordinatorSpec
from pollinate.deploy.gateway import FleetGateway, GatewayConfig, GatewayThread
from pollinate.deploy.join import JoinSpec, Node
from pollinate.deploy.keys import CertPaths, create_node_key, init_certs
from pollinate.deploy.processes import free_loopback_port

# The ServerApp/ClientApp processes import the app by this name (not `__main__` when run with -m).
_MODULE = "pollinate.deploy.gateway_bench"
server_app = ServerApp()
client_app = ClientApp()


@server_app.main()
def _bench_main(grid: Grid, context: Context) -> None:
    """Send `payload-mb` of float32 to the one node each round and time until its echo is back."""
    rounds, size = int(context.run_config["num-rounds"]), float(context.run_config["payload-mb"])
    deadline = time.monotonic() + 120
    while not (nodes := list(grid.get_node_ids())):
        if time.monotonic() > deadline:
            raise RuntimeError("no node joined within 120 s")
        time.sleep(0.2)
    payload = np.random.default_rng(0).standard_normal(int(size * 2**20 / 4), dtype=np.float32)
    seconds = []
    for server_round in range(1, rounds + 1):
        content = RecordDict({"arrays": ArrayRecord([payload]), "config": ConfigRecord({"round": server_round})})
        started = time.perf_counter()
        replies = list(grid.send_and_receive([Message(content, nodes[0], "train")], timeout=600))
        seconds.append(time.perf_counter() - started)
        if len(replies) != 1 or replies[0].has_error():
            raise RuntimeError(f"round {server_round}: {[r.error.reason for r in replies if r.has_error()]}")
    Path(str(context.run_config["result-path"])).write_text(json.dumps({"round_s": seconds}))


@client_app.train()
def _bench_echo(msg: Message, context: Context) -> Message:
    return Message(RecordDict({"arrays": msg.content["arrays"]}), reply_to=msg)


def deployment_rounds(work: Path, certs: Path, payload_mb: float, rounds: int, through_gateway: bool) -> list[float]:
    """Round seconds of one coordinator run with one node, dialling the gateway or the SuperLink itself."""
    work.mkdir(parents=True)
    private, public = create_node_key(work / "keys", "node")
    spec = CoordinatorSpec(
        run_dir=work / "run", server_app=f"{_MODULE}:server_app", client_app=f"{_MODULE}:client_app",
        run_config={"num-rounds": rounds, "payload-mb": payload_mb, "result-path": str(work / "result.json")},
        port=(ports := _two_ports())[0], superlink_port=ports[1], certs_dir=certs, node_public_keys=[public],
    )
    coordinator = Coordinator(spec, echo=None)
    outcome: dict = {}
    runner = threading.Thread(
        target=lambda: _keep_error(outcome, lambda: outcome.update(result=coordinator.run(timeout_s=1800))), daemon=True
    )
    runner.start()
    port = spec.port if through_gateway else spec.superlink_port
    join = JoinSpec(coordinator=f"127.0.0.1:{port}", work_dir=work / "node", ca_cert=CertPaths.in_dir(certs).ca_cert,
                    private_key=private)
    if not through_gateway:
        join.app_signing_key = None  # only the gateway attaches the coordinator's signature
    node = Node(join, echo=None)
    joined = threading.Thread(target=lambda: _keep_error(outcome, node.run), daemon=True)
    try:
        if not coordinator.ready.wait(120):
            raise RuntimeError(f"coordinator did not start (logs in {spec.run_dir / 'logs'})")
        joined.start()
        runner.join()
    finally:
        node.stop()
        coordinator.stop()
        if joined.is_alive():
            joined.join(30)  # the node's thread stops its SuperNode: wait, or the process outlives us
    if "result" not in outcome:
        raise RuntimeError(f"run did not complete: {outcome.get('error')} (logs in {work})")
    return json.loads((work / "result.json").read_text())["round_s"][1:]


def _two_ports() -> tuple[int, int]:
    """Two distinct free loopback ports (the OS may hand out a just-released port again)."""
    first = free_loopback_port()
    while (second := free_loopback_port()) == first:
        pass
    return first, second


def _keep_error(outcome: dict, fn) -> None:  # noqa: ANN001
    try:
        fn()
    except Exception as err:  # noqa: BLE001 - reported by the caller
        outcome["error"] = err


async def _echo(scope, receive, send) -> None:  # noqa: ANN001 - ASGI
    if scope["type"] != "http":
        return
    size = 0
    while True:
        message = await receive()
        size += len(message.get("body", b""))
        if not message.get("more_body"):
            break
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/protobuf"), (b"content-length", str(size).encode())]})
    await send({"type": "http.response.body", "body": bytes(size)})


def forwarding_seconds(certs: CertPaths, mb: float, requests: int) -> dict[str, list[float]]:
    """Seconds per request of `mb` up and `mb` down to a TLS stand-in SuperLink, direct and via the gateway."""
    upstream_port, gateway_port = _two_ports()
    server = uvicorn.Server(uvicorn.Config(_echo, host="127.0.0.1", port=upstream_port, log_level="warning",
                                          ssl_certfile=str(certs.server_cert), ssl_keyfile=str(certs.server_key)))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    config = GatewayConfig("127.0.0.1", gateway_port, f"127.0.0.1:{upstream_port}", certfile=certs.server_cert,
                           keyfile=certs.server_key, upstream_ca=certs.ca_cert)
    gateway = GatewayThread(FleetGateway(config)).start()
    body, times = bytes(int(mb * 2**20)), {"direct": [], "gateway": []}
    try:
        while not server.started:
            time.sleep(0.05)
        with httpx.Client(verify=str(certs.ca_cert), timeout=60) as client:
            for _ in range(requests):
                for mode, port in (("direct", upstream_port), ("gateway", gateway_port)):
                    started = time.perf_counter()
                    answer = client.post(f"https://127.0.0.1:{port}/v1/fleet/push-object", content=body)
                    assert answer.status_code == 200 and len(answer.content) == len(body)
                    times[mode].append(time.perf_counter() - started)
    finally:
        gateway.stop()
        server.should_exit = True
        thread.join(10)
    return times


def _row(label: str, direct: list[float], gateway: list[float], unit: float = 1.0, digits: int = 2) -> str:
    """Median and mean of each side and what the gateway adds to each (in `unit`, e.g. 1000 for ms)."""
    cells = [label, str(len(direct))]
    for stat in (statistics.median, statistics.mean):
        d, g = stat(direct) * unit, stat(gateway) * unit
        cells += [f"{d:.{digits}f}", f"{g:.{digits}f}", f"{g - d:+.{digits}f} ({100 * (g - d) / d:+.1f}%)"]
    return "| " + " | ".join(cells) + " |"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--payload-mb", type=float, nargs="+", default=[2.0, 50.0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--forward-mb", type=float, default=5.0)
    parser.add_argument("--forward-requests", type=int, default=40)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="gateway-bench-") as tmp:
        work = Path(tmp)
        certs = init_certs(work / "certs", ["coordinator.test"])
        print("| measured | n | direct median | gateway median | gateway adds | direct mean | gateway mean "
              "| gateway adds |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        raw: dict[float, dict[str, list[float]]] = {}
        for mb in args.payload_mb:
            rounds: dict[bool, list[float]] = {False: [], True: []}
            for repeat in range(args.repeats):
                for through_gateway in (False, True):
                    name = f"{mb}-{repeat}-{'gw' if through_gateway else 'direct'}"
                    rounds[through_gateway] += deployment_rounds(work / name, certs.ca_cert.parent, mb,
                                                                 args.rounds, through_gateway)
            print(_row(f"round (s), {mb:g} MB each way", rounds[False], rounds[True]), flush=True)
            raw[mb] = {"direct": [round(t, 2) for t in rounds[False]], "gateway": [round(t, 2) for t in rounds[True]]}
        print(f"\nround seconds, in run order: {json.dumps(raw)}\n")
        if args.forward_mb > 0:
            times = forwarding_seconds(certs, args.forward_mb, args.forward_requests)
            print(_row(f"one request (ms), {args.forward_mb:g} MB up + {args.forward_mb:g} MB down",
                       times["direct"], times["gateway"], unit=1000, digits=1))


if __name__ == "__main__":
    main()
