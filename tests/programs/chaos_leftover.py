"""A program that leaves a child behind: it ignores SIGTERM and so does its child.

Prints ``child <pid>`` then ``ready``, then waits forever.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

signal.signal(signal.SIGTERM, signal.SIG_IGN)  # inherited by the child
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
sys.stdout.write(f"child {child.pid}\nready\n")
sys.stdout.flush()
time.sleep(600)
