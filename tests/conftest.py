"""Shared test settings."""
import torch

# The tiny models of the tests run fastest on one thread; on a busy 2-core machine, two intra-op threads
# spin against each other and a step can take 20x longer.
torch.set_num_threads(1)
