import torch

# The suite is many small tensor operations on a shared 2-core machine: one intra-op thread is
# several times faster than two fighting over the cores.
torch.set_num_threads(1)
