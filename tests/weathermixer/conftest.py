"""One intra-op thread: these models are tiny, and on a shared 2-core machine a second
thread only spins (a 10 ms step becomes 20-50 ms under load)."""

import torch

torch.set_num_threads(1)
