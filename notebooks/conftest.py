"""nbval settings for the notebooks (the kernel inherits this process's environment)."""
import os
import tempfile

# Progress bars off inside nbval's kernel: nbval drains the kernel's messages only after a
# cell finishes, and a long cell's widget updates overflow ZeroMQ's queue (see repro/progress.py).
os.environ["REPRO_PROGRESS"] = "0"
# A fresh, empty results directory for every test session: the notebooks compute their records
# with the code under test instead of re-reading ones a previous version wrote to outputs/.
os.environ["REPRO_OUTPUTS"] = tempfile.mkdtemp(prefix="repro-nbval-")
