"""A process left behind by a SuperNode that died (a ClientApp orphaned mid-start) is adopted and stopped by the
`pollinate join` process, never left running under init."""

import subprocess
import sys

SCRIPT = """
import subprocess, time, psutil
from pollinate.deploy.processes import adopt_orphans, stop_descendants
assert adopt_orphans()
# A 'SuperNode' that starts a long-lived child and exits at once: the child is orphaned.
subprocess.run([sys.executable, "-c", "import subprocess, sys; subprocess.Popen(['sleep', '300'])"], check=True)
time.sleep(0.5)
orphans = psutil.Process().children(recursive=True)
print(len(orphans), stop_descendants(grace_s=2), len(psutil.Process().children(recursive=True)))
"""


def test_join_process_adopts_and_stops_what_a_dead_supernode_left_behind():
    out = subprocess.run([sys.executable, "-c", "import sys\n" + SCRIPT], capture_output=True, text=True,
                         timeout=60, check=True).stdout.split()
    assert out == ["1", "1", "0"]  # adopted (not re-parented to init), stopped, nothing left
