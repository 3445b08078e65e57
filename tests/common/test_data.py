"""Data: the built-in task, file loading with clear errors, and partitioning over clients."""

import json
from collections import Counter
from pathlib import Path

import pytest

from pollinate.common.config import DataConfig
from pollinate.common.data import SKILLS, DataError, generate_skills, load_task, partition_indices


def test_builtin_task_answers_are_checkable():
    rows = generate_skills(50, seed=3)
    assert Counter(r["skill"] for r in rows) == {name: 10 for name in SKILLS}
    for row in rows:
        if row["skill"] == "add":
            a, b = (int(x) for x in row["prompt"].removeprefix("What is ").rstrip("?").split(" + "))
            assert int(row["response"]) == a + b
        if row["skill"] == "reverse":
            assert row["prompt"].split("'")[1][::-1] == row["response"]
    assert generate_skills(50, seed=3) == rows and generate_skills(50, seed=4) != rows


def test_eval_split_is_disjoint_from_training_for_files(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"p{i}", "response": f"r{i}", "cat": i % 3}) + "\n"
                            for i in range(100)))
    task = load_task(DataConfig(source=str(path), partition="iid", eval_examples=10), "generation", 0)
    assert len(task.eval) == 10 and len(task.train) == 90
    assert not {r["prompt"] for r in task.eval} & {r["prompt"] for r in task.train}


@pytest.mark.parametrize("mode", ["iid", "dirichlet", "pathological"])
def test_partitions_are_disjoint_and_cover_all_rows(mode):
    rows = generate_skills(200, seed=0)
    parts = partition_indices(rows, 5, DataConfig(partition=mode), "skill", seed=0)
    flat = [i for p in parts for i in p]
    assert sorted(flat) == list(range(200))
    assert all(parts)


def test_pathological_gives_each_client_its_configured_number_of_skills():
    rows = generate_skills(200, seed=0)
    parts = partition_indices(rows, 5, DataConfig(partition="pathological", classes_per_client=1), "skill", 0)
    assert [len({rows[i]["skill"] for i in p}) for p in parts] == [1] * 5


def test_dirichlet_small_alpha_is_skewed():
    rows = generate_skills(500, seed=0)
    parts = partition_indices(rows, 4, DataConfig(partition="dirichlet", dirichlet_alpha=0.1), "skill", 0)
    top_share = [Counter(rows[i]["skill"] for i in p).most_common(1)[0][1] / len(p) for p in parts]
    assert sum(top_share) / len(top_share) > 0.5  # iid would give ~0.2


def test_fewer_examples_than_clients_is_an_error():
    with pytest.raises(DataError, match="3 training examples cannot be split over 4 clients"):
        partition_indices(generate_skills(3, 0), 4, DataConfig(partition="iid"), "skill", 0)


def test_missing_field_lists_the_fields_the_file_has(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    with pytest.raises(DataError, match=r"no field 'prompt' \(set by data.prompt_field\); its fields are "
                                        r"\['answer', 'question'\]"):
        load_task(DataConfig(source=str(path)), "generation", 0)


def test_csv_and_saved_dataset_load_with_configured_fields(tmp_path):
    from datasets import Dataset

    csv_path = tmp_path / "d.csv"
    csv_path.write_text("sentence,klass\n" + "".join(f"text {i},{'pos' if i % 2 else 'neg'}\n" for i in range(40)))
    cfg = DataConfig(source=str(csv_path), text_field="sentence", label_field="klass", eval_examples=4)
    task = load_task(cfg, "classification", 0)
    assert task.labels == ["neg", "pos"] and {r["label"] for r in task.train} == {0, 1}
    Dataset.from_list([{"prompt": f"p{i}", "response": f"r{i}", "skill": "s"} for i in range(30)]).save_to_disk(
        str(tmp_path / "ds"))
    task = load_task(DataConfig(source=str(tmp_path / "ds"), eval_examples=3, partition="iid"), "generation", 0)
    assert len(task.train) + len(task.eval) == 30


def test_real_classification_file_partitions_by_label():

    path = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "poem_sentiment" / "train.jsonl"
    if not path.exists():
        pytest.skip("../shared/data is not beside the checkout")
    cfg = DataConfig(source=str(path), partition="pathological", classes_per_client=1, eval_examples=20)
    task = load_task(cfg, "classification", 0)
    parts = partition_indices(task.train, 4, cfg, task.partition_by, 0)
    assert [len({task.train[i]["label"] for i in p}) for p in parts] == [1, 1, 1, 1]


def test_a_partition_left_empty_is_an_error_naming_the_partitioning():
    rows = generate_skills(12, seed=0)
    with pytest.raises(DataError, match="(partition \\d+ of 10 is empty|partitioning 'dirichlet' failed)"):
        partition_indices(rows, 10, DataConfig(partition="dirichlet", dirichlet_alpha=0.01), "skill", 0)


def test_a_file_is_used_in_full_by_default_and_capped_only_when_asked(tmp_path):
    """The BANKING77 training file has 10,003 rows: every row not held out for evaluation trains."""
    path = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "banking77" / "train.jsonl"
    if not path.is_file():
        pytest.skip("../shared/data is not beside the checkout")
    source = str(path)
    task = load_task(DataConfig(source=source, eval_examples=500), "classification", 0)
    assert len(task.train) + len(task.eval) == 10_003 and len(task.eval) == 500
    capped = load_task(DataConfig(source=source, eval_examples=500, max_train_examples=1000), "classification", 0)
    assert len(capped.train) == 1000 and capped.eval == task.eval


def test_builtin_task_size_is_its_own_key():
    assert len(load_task(DataConfig(builtin_examples=120), "generation", 0).train) == 120
    assert len(load_task(DataConfig(builtin_examples=120, max_train_examples=50), "generation", 0).train) == 50


def test_a_directory_of_files_reads_every_file_in_name_order(tmp_path):
    for name, start in (("b.jsonl", 10), ("a.jsonl", 0)):
        (tmp_path / name).write_text("".join(json.dumps({"prompt": f"p{i}", "response": "r", "cat": name}) + "\n"
                                             for i in range(start, start + 10)))
    (tmp_path / "README.md").write_text("not data")
    task = load_task(DataConfig(source=str(tmp_path), partition="iid", eval_examples=2), "generation", 0)
    assert sorted(r["prompt"] for r in task.train + task.eval) == sorted(f"p{i}" for i in range(20))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="holds no .jsonl/.csv"):
        load_task(DataConfig(source=str(empty), partition="iid"), "generation", 0)
