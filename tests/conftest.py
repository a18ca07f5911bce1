"""Test-suite setup shared by every module: one torch thread.

The suite's models are tiny, so their kernels are overhead-bound and a second thread only adds
contention; on the 2-core CI machine the DDP tests also start torchrun subprocesses beside pytest,
and oversubscribed threads made tiny-model tests up to 50x slower.

Without CUDA, Triton kernels (dslm.sim.fused) run in Triton's interpreter: TRITON_INTERPRET must
be set before triton is first imported, because Triton's own library functions (its Philox
generator among them) are compiled or interpreted as decided at that import."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(1)
