"""A module fixture running torch on one intra-op thread, restored afterwards.

On a CPU shared by more processes than cores, two OpenMP threads make every operator wait
for a descheduled partner (a batch-1 resnet18 forward: 3.4 s on 2 threads, 0.085 s on 1);
the occlusion tests run hundreds of small operators, so they take one thread.
"""
import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
