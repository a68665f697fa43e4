"""pytest set-up for the whole suite: one CPU thread per test process.

With torch's default of one OpenMP thread per core, a second busy process on a 2-core machine
(another torch program, say) leaves each of our threads waiting at every parallel region for a
sibling that has lost its core, and OpenMP's waiting threads spin: measured on this project's
2-core machine, the suite then took 8 times its quiet wall time and 4.6 times its CPU time. One
thread has no siblings to wait for (README.md gives the times, quiet and loaded).
"""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # read when torch is first imported, and by children

import torch  # noqa: E402  (after the variable, on purpose)

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
