"""Data sources: .json (an array or JSON lines), .jsonl, .csv, .parquet, directories of data files (their .json
metadata skipped), saved datasets, and Hugging Face dataset ids read offline from the local Hub cache."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pollinate.common.config_io import build_config
from pollinate.common.data import DataError, load_task
from pollinate.common.data_files import read_rows, read_source

ROWS = [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(6)]
REVISION = "fedcba9876543210fedcba9876543210fedcba98"


def test_json_arrays_and_json_lines_read_the_same_rows(tmp_path):
    array, lines = tmp_path / "array.json", tmp_path / "lines.json"
    array.write_text(json.dumps(ROWS))
    lines.write_text("\n".join(json.dumps(r) for r in ROWS))
    assert read_rows(array) == read_rows(lines) == ROWS
    (tmp_path / "scalar.json").write_text("[1, 2]")
    with pytest.raises(DataError, match="JSON array of objects"):
        read_rows(tmp_path / "scalar.json")


def test_parquet_files_read_through_pyarrow(tmp_path):
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "rows.parquet")
    assert read_rows(tmp_path / "rows.parquet") == ROWS


def test_a_directory_reads_its_data_files_in_name_order_and_skips_json_metadata(tmp_path):
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS[3:]))
    pq.write_table(pa.Table.from_pylist(ROWS[:3]), tmp_path / "a.parquet")
    (tmp_path / "labels.json").write_text(json.dumps(["x", "y"]))
    assert read_rows(tmp_path) == ROWS
    with pytest.raises(DataError, match="unsupported type.*.parquet"):
        read_rows(tmp_path / "labels.txt")


@pytest.fixture
def hub_datasets(tmp_path, monkeypatch):
    """A Hub cache holding ``test-org/qa`` as ``hf download --repo-type dataset`` leaves it: train and test
    parquet files and a README."""
    snapshot = tmp_path / "hub" / "datasets--test-org--qa" / "snapshots" / REVISION
    (snapshot / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(ROWS), snapshot / "data" / "train-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(ROWS[:2]), snapshot / "data" / "test-00000-of-00001.parquet")
    (snapshot / "README.md").write_text("# qa")
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text(REVISION)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hub"


def test_a_cached_hub_dataset_id_reads_its_train_split(hub_datasets):
    rows, name = read_source("test-org/qa")
    assert rows == ROWS and name == "qa"
    cfg = build_config(None, ["data.source=test-org/qa", "data.partition=iid", "data.eval_examples=1"]).data
    task = load_task(cfg, "generation", 0)
    assert len(task.train) + len(task.eval) == len(ROWS)


def test_an_uncached_hub_dataset_says_where_it_looked_and_how_to_get_it(hub_datasets):
    with pytest.raises(DataError) as error:
        read_source("test-org/absent")
    message = str(error.value)
    assert "'test-org/absent' is not in the local Hugging Face cache" in message and str(hub_datasets) in message
    assert "hf download test-org/absent --repo-type dataset" in message and "\n" not in message
    with pytest.raises(DataError, match="neither a built-in task, an existing file"):
        read_source("no/such/path.jsonl")
