"""Test-suite setup shared by every module: one torch thread.

The suite's models are tiny, so their kernels are overhead-bound and a second thread only adds
contention; on the 2-core CI machine the DDP tests also start torchrun subprocesses beside pytest,
and oversubscribed threads made tiny-model tests up to 50x slower."""
import torch

torch.set_num_threads(1)
