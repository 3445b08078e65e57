"""Following metrics.jsonl as it grows: partial last lines wait, malformed and oversized lines are skipped."""

import json
import os

from pollinate.dashboard.tail import MetricsTail


def append(path, text: str | bytes) -> None:
    with open(path, "ab") as fh:
        fh.write(text.encode() if isinstance(text, str) else text)


def test_a_missing_file_reads_as_nothing_until_it_appears(tmp_path):
    tail = MetricsTail(tmp_path / "metrics.jsonl")
    assert tail.read() == []
    append(tmp_path / "metrics.jsonl", '{"type": "round", "round": 1}\n')
    assert tail.read() == [{"type": "round", "round": 1}]


def test_a_partial_last_line_is_read_once_it_is_complete(tmp_path):
    path = tmp_path / "metrics.jsonl"
    tail = MetricsTail(path)
    append(path, '{"type": "client", "round": 1}\n{"type": "rou')
    assert tail.read() == [{"type": "client", "round": 1}]
    append(path, 'nd", "round": 1')
    assert tail.read() == []
    append(path, "}\n")
    assert tail.read() == [{"type": "round", "round": 1}]
    assert tail.read() == [] and tail.skipped == 0


def test_malformed_lines_are_skipped_and_counted(tmp_path):
    path = tmp_path / "metrics.jsonl"
    append(path, "\n".join(['{"type": "a"}', "not json", "[1, 2]", '"text"', "{broken", "", '{"type": "b"}']) + "\n")
    append(path, b'\xff\xfe{"type": "bad bytes"}\n')
    tail = MetricsTail(path)
    assert [e["type"] for e in tail.read()] == ["a", "b"]
    assert tail.skipped == 5


def test_an_oversized_line_is_dropped_whole_even_across_reads(tmp_path):
    path = tmp_path / "metrics.jsonl"
    tail = MetricsTail(path, max_line_bytes=100)
    append(path, '{"type": "small"}\n{"type": "big", "pad": "' + "x" * 150)
    assert [e["type"] for e in tail.read()] == ["small"]
    append(path, "y" * 150)
    assert tail.read() == []
    append(path, '"}\n{"type": "after"}\n')
    assert [e["type"] for e in tail.read()] == ["after"]
    assert tail.skipped == 1


def test_reads_are_bounded_and_catch_up_over_several_calls(tmp_path):
    path = tmp_path / "metrics.jsonl"
    append(path, "".join(json.dumps({"type": "client", "round": i}) + "\n" for i in range(50)))
    tail = MetricsTail(path, max_read_bytes=256)
    seen = []
    for _ in range(100):
        seen += tail.read()
    assert [e["round"] for e in seen] == list(range(50))


def test_a_replaced_or_truncated_file_is_read_from_its_start(tmp_path):
    path = tmp_path / "metrics.jsonl"
    append(path, '{"type": "old"}\n' * 3)
    tail = MetricsTail(path)
    assert len(tail.read()) == 3
    replacement = tmp_path / "new.jsonl"
    append(replacement, '{"type": "new"}\n')
    os.replace(replacement, path)
    assert [e["type"] for e in tail.read()] == ["new"] and tail.restarts == 1
    path.write_text('{"type": "a"}\n')  # cut shorter than what was read: the file started over
    assert [e["type"] for e in tail.read()] == ["a"] and tail.restarts == 2
