"""FedPipe's plan table on the run's console: one row per planned client, nothing when the run is quiet."""

import io

from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from rich.console import Console

from pollinate.common.config_io import build_config
from pollinate.common.profiles import TIER_PROFILES
from pollinate.common.report import RunRecorder
from pollinate.methods.fedpipe.plan_table import print_plan_table, ranks_text
from pollinate.methods.fedpipe.server import FedPipe

PLANS = {
    "10": {"modules": 16, "ranks": {4: 2, 2: 14}, "bits": 8, "batch_size": 4, "local_steps": 12,
           "est_memory_mib": 512.25, "est_compute_s": 3.456, "est_comm_s": 0.5},
    "2": {"modules": 4, "ranks": {"16": 4}, "bits": 4, "batch_size": 1, "local_steps": 0,
          "est_memory_mib": 96.0, "est_compute_s": 1.0, "est_comm_s": 0.125},
}
PROFILES = {"10": "strong", "2": "[bold]weak[/bold]"}


def recorder(tmp_path, quiet: bool, is_terminal: bool = False) -> tuple[RunRecorder, io.StringIO]:
    out = io.StringIO()
    console = Console(file=out, width=80, force_terminal=is_terminal, color_system=None)
    return RunRecorder(tmp_path, {"rounds_planned": 1}, console=console, quiet=quiet), out


def test_ranks_show_as_a_histogram_lowest_rank_first():
    assert ranks_text({4: 2, 2: 14}) == "r2×14 r4×2"
    assert ranks_text({"16": 4, "8": 1}) == "r8×1 r16×4"
    assert ranks_text({}) == "–"


def test_each_client_gets_one_row_with_its_plan_and_estimates(tmp_path):
    rec, out = recorder(tmp_path, quiet=False)
    print_plan_table(rec, PLANS, PROFILES, server_round=0)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("FedPipe plan (estimated per round")
    header = next(line for line in lines if "client" in line)
    assert header.split() == ["client", "profile", "mods", "ranks", "bits", "batch", "steps", "MiB", "comp", "s",
                              "comm", "s"]
    rows = [line.split() for line in lines if line.strip()[:1].isdigit()]
    assert rows == [["2", "[bold]weak[/bold]", "4", "r16×4", "4", "1", "default", "96.0", "1.00", "0.12"],
                    ["10", "strong", "16", "r2×14", "r4×2", "8", "4", "12", "512.2", "3.46", "0.50"]]


def test_a_log_file_keeps_one_line_per_client_and_a_terminal_wraps_the_ranks_within_its_width(tmp_path):
    wide = {"7": {**PLANS["10"], "ranks": {2: 3, 4: 5, 8: 10, 16: 2, 32: 1}}}
    rec, out = recorder(tmp_path, quiet=False)
    print_plan_table(rec, wide, {"7": "strong"}, server_round=0)
    (row,) = [line for line in out.getvalue().splitlines() if "r2×3" in line]
    assert "r2×3 r4×5 r8×10 r16×2 r32×1" in row and len(row.rstrip()) > 80
    rec, out = recorder(tmp_path, quiet=False, is_terminal=True)
    print_plan_table(rec, wide, {"7": "strong"}, server_round=0)
    lines = out.getvalue().splitlines()
    assert max(len(line) for line in lines) <= 80 and " ".join(lines).count("r32×1") == 1


def test_a_quiet_run_or_an_empty_plan_prints_nothing(tmp_path):
    rec, out = recorder(tmp_path, quiet=True)
    print_plan_table(rec, PLANS, PROFILES, server_round=0)
    rec_empty, out_empty = recorder(tmp_path, quiet=False)
    print_plan_table(rec_empty, {}, {}, server_round=0)
    assert out.getvalue() == "" and out_empty.getvalue() == ""


def test_late_joiners_get_a_table_titled_with_their_round(tmp_path):
    rec, out = recorder(tmp_path, quiet=False)
    print_plan_table(rec, {"3": PLANS["2"]}, {}, server_round=4)
    assert out.getvalue().startswith("FedPipe plan of clients joining in round 4 (estimated")


def test_re_planned_clients_get_a_table_titled_with_the_round_their_new_plan_is_for(tmp_path):
    rec, out = recorder(tmp_path, quiet=False)
    print_plan_table(rec, {"3": PLANS["2"]}, {}, server_round=2, replanned=True)
    assert out.getvalue().startswith("FedPipe plan of clients re-planned for round 2 (estimated")


def test_the_server_prints_the_table_when_it_plans_round_0(tmp_path, monkeypatch):
    for name, value in (("_run_id", 1), ("_node_id", 1), ("_task_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)
    cfg = build_config(None, ['model.name="tiny-llama"', 'method="fedpipe"', "federation.clients=2"])
    rec, out = recorder(tmp_path, quiet=False)
    strategy = FedPipe(cfg, rec, tmp_path)
    module = next(iter(strategy.shapes))
    tiers = {31: ("strong", 0), 32: ("weak", 1)}

    class Grid:
        def send_and_receive(self, messages, timeout):
            replies = []
            for message in messages:
                tier, client = tiers[message.metadata.dst_node_id]
                message.metadata.__dict__["_message_id"] = f"m{client}"
                content = RecordDict({"scores": MetricRecord({module: 1.0}),
                                      "profile": ConfigRecord(TIER_PROFILES[tier].to_dict()),
                                      "metrics": MetricRecord({"client_id": client, "num-examples": 10}),
                                      "tokens": MetricRecord({"quantiles": [4, 8, 16]})})
                replies.append(Message(content, reply_to=message))
            return replies

    strategy._prepare_nodes(Grid(), [31, 32], server_round=0)
    text = out.getvalue()
    assert "FedPipe plan" in text and set(strategy.plans) == {0, 1}
    rows = {line.split()[0]: line for line in text.splitlines() if line.strip()[:1].isdigit()}
    assert set(rows) == {"0", "1"} and " strong " in rows["0"] and " weak " in rows["1"]
