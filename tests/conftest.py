"""Suite-wide settings."""

import os

import torch

# The tests' models are tiny: one intra-op thread is as fast on an idle machine and many times faster on a
# busy one, where torch's threads spin against other processes for the same cores. LIGHTNING_DDD_TEST_THREADS
# sets another number.
torch.set_num_threads(int(os.environ.get("LIGHTNING_DDD_TEST_THREADS", "1")))
