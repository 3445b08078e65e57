"""What a simulation asks of Ray: per-client CPUs and GPUs, a local Ray sized to this host or an existing
cluster at ``federation.ray_address``."""

import pytest

from pollinate.common.config import ConfigError
from pollinate.common.config_io import build_config
from pollinate.simulations.run import backend_config, check_client_gpus


def test_a_local_ray_gets_the_cpus_whole_clients_fit_in_and_clients_no_gpu_by_default():
    config = backend_config(build_config(None, ["federation.client_cpus=1.5"]), cpu_count=16)
    assert config["client_resources"] == {"num_cpus": 1.5, "num_gpus": 0.0}
    assert config["init_args"]["num_cpus"] == 10 * 1.5  # 10 clients of 1.5 cores fit in 16
    assert "address" not in config["init_args"]


def test_each_client_reserves_its_fraction_of_a_gpu():
    config = backend_config(build_config(None, ["federation.client_gpus=0.25"]), cpu_count=4)
    assert config["client_resources"] == {"num_cpus": 1.0, "num_gpus": 0.25}


def test_an_existing_cluster_is_joined_at_its_address_without_local_resources():
    cfg = build_config(None, ["federation.ray_address=ray://head:10001", "federation.client_gpus=1"])
    config = backend_config(cfg, cpu_count=2)
    assert config["init_args"]["address"] == "ray://head:10001"
    assert "num_cpus" not in config["init_args"] and "num_gpus" not in config["init_args"]  # Ray refuses them
    assert config["client_resources"] == {"num_cpus": 1.0, "num_gpus": 1.0}


def test_clients_that_reserve_a_gpu_need_one_here_unless_on_a_cluster():
    with pytest.raises(ConfigError, match="federation.client_gpus = 0.5 but this host has no CUDA GPU"):
        check_client_gpus(build_config(None, ["federation.client_gpus=0.5"]), gpus=0)
    check_client_gpus(build_config(None, ["federation.client_gpus=0.5"]), gpus=1)
    check_client_gpus(build_config(None, ["federation.client_gpus=0.5", "federation.ray_address=auto"]), gpus=0)
    with pytest.raises(ConfigError, match="federation.client_gpus"):
        build_config(None, ["federation.client_gpus=-1"])


def test_the_engine_line_names_the_workers_of_a_local_ray_or_the_cluster_address():
    from pollinate.simulations.run import describe_engine

    local = backend_config(build_config(None, ["federation.client_cpus=0.7"]), cpu_count=5)
    assert describe_engine(local) == "starting the simulation engine (Ray) with 7 workers..."
    one = backend_config(build_config(None, ["federation.client_cpus=2"]), cpu_count=3)
    assert describe_engine(one) == "starting the simulation engine (Ray) with 1 worker..."
    cluster = backend_config(build_config(None, ["federation.ray_address=10.0.0.5:6379"]))
    assert describe_engine(cluster) == "connecting the simulation engine (Ray) to the cluster at 10.0.0.5:6379..."
