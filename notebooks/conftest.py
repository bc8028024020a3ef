"""nbval settings for the notebooks (the kernel inherits this process's environment)."""
import os

# Progress bars off inside nbval's kernel: nbval drains the kernel's messages only after a
# cell finishes, and a long cell's widget updates overflow ZeroMQ's queue (see repro/progress.py).
os.environ["REPRO_PROGRESS"] = "0"
