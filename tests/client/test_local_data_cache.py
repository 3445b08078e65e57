"""A simulation worker serving many clients loads and partitions the task once, not once per client (the round
time of a 1,000-client simulation must not grow with the number of registered clients)."""

from pollinate.client import runtime
from pollinate.common.config_io import build_config


def test_clients_served_by_one_process_share_one_task_load_and_one_partitioning(monkeypatch):
    calls = {"load_task": 0, "partition_indices": 0}

    def counting(name):
        real = getattr(runtime, name)

        def wrapper(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)
        return wrapper

    for name in calls:
        monkeypatch.setattr(runtime, name, counting(name))
    cfg = build_config(None, ["model.name=tiny-llama", "federation.clients=50", "data.builtin_examples=200",
                              "federation.seed=4242"])  # a seed no other test uses: nothing cached yet
    datasets = [runtime.local_data(cfg, {"partition-id": i, "num-partitions": 50}) for i in range(50)]
    assert calls == {"load_task": 1, "partition_indices": 1}
    assert [d.client_id for d in datasets] == list(range(50))
    assert sum(d.num_examples + len(d.eval_encoded) for d in datasets) == 200  # every row in exactly one client
    runtime.drop_cached(("task",))
    runtime.drop_cached(("data",))
