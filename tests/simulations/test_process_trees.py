"""Process-tree helpers of the fault experiments: a process's start time must not read earlier than it was, or a
ClientApp started just after a round was recorded looks like one of the previous round's."""

import subprocess
import sys
import time

import psutil
import pytest

from pollinate.simulations.process_trees import clientapps_since, started_at


@pytest.mark.skipif(not hasattr(time, "CLOCK_BOOTTIME"), reason="boot clock is Linux only")
def test_a_child_started_after_a_moment_is_seen_as_started_after_it():
    for _ in range(5):  # five children: psutil's whole-second boot time is early by the same fraction for each
        before = time.time()
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(5)"])
        try:
            start = started_at(psutil.Process(child.pid))
            assert before - 0.02 <= start <= time.time() + 0.02  # the kernel counts starts in 10 ms ticks
        finally:
            child.kill()
            child.wait()


def test_clientapps_since_finds_only_flower_clientapps_started_later(tmp_path):
    fake = tmp_path / "flwr-clientapp"  # a stand-in with the ClientApp's name in its command line
    fake.write_text("import time\ntime.sleep(5)\n")
    parent = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time\n"
                               f"subprocess.Popen([sys.executable, {str(fake)!r}]); time.sleep(5)"])
    try:
        found = []
        for _ in range(50):
            if found := clientapps_since(parent.pid, time.time() - 10):
                break
            time.sleep(0.1)
        assert len(found) == 1 and str(fake) in found[0].cmdline()
        assert clientapps_since(parent.pid, time.time()) == []
    finally:
        for proc in psutil.Process(parent.pid).children(recursive=True):
            proc.kill()
        parent.kill()
        parent.wait()
