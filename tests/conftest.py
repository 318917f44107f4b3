"""Suite-wide settings: keep torch to one thread so tests behave the same on a 2-core CI machine."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

try:  # the API-only install has no torch; its tests must still run
    import torch

    torch.set_num_threads(1)
except ImportError:  # pragma: no cover
    pass
