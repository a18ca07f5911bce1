"""Run by tests/test_train_ddp.py under ``torchrun --nproc_per_node=2``: a tiny pretraining run (no
dropout; fp32, or bf16 for ``fsdp-bf16``) whose per-step losses must equal single-process gradient
accumulation, wrapped in DDP or FSDP2, optionally stopped early (``STOP_AT``) or resumed (``LOAD``)."""
import json
import os
import sys

import torch

torch.set_num_threads(1)

from dslm.model import BertConfig  # noqa: E402
from dslm.train.distributed import exit_process  # noqa: E402
from dslm.train.engine import TrainConfig, train  # noqa: E402
from dslm.pretrain.bert import PretrainTask  # noqa: E402


def tiny_task(data_dir, vocab_size):
    config = BertConfig(vocab_size=vocab_size, hidden_size=32, num_layers=2, num_heads=2, max_position_embeddings=64,
                        hidden_dropout=0.0, attention_dropout=0.0)
    return PretrainTask(data_dir, config, seq_len=32, seed=7, num_workers=0)


def record_gathered_dtype(task, seen: set):
    """Make ``task`` build models whose first transformer layer's first Linear records the dtype of
    its weight at every forward: under FSDP2 the weight it sees is the gathered (unsharded) one."""
    from torch import nn

    build = task.build_model

    def build_model():
        model = build()
        linear = next(m for m in model.bert.layers[0].modules() if isinstance(m, nn.Linear))
        linear.register_forward_pre_hook(lambda module, args: seen.add(str(module.weight.dtype)))
        return model
    task.build_model = build_model
    return task


def uneven_eval_task(n_items: int):
    """A toy regression task whose model has repeated blocks (FSDP shards them) and whose eval split
    of ``n_items`` gives the two ranks different numbers of eval batches."""
    from torch import nn

    from test_train_engine import ToyData, ToyTask

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.out = nn.Linear(6, 16), nn.Linear(16, 1)
            self.layers = nn.ModuleList(nn.Linear(16, 16) for _ in range(2))

        def forward(self, x):
            h = self.inp(x)
            for layer in self.layers:
                h = torch.tanh(layer(h))
            return self.out(h)

    class Uneven(ToyTask):
        def build_model(self):
            return Net()

        def eval_datasets(self):
            return {"valid": ToyData(n_items)}

    return Uneven()


if __name__ == "__main__":
    if sys.argv[1] == "uneven-eval":   # args: uneven-eval OUT N_ITEMS
        cfg = TrainConfig(out_dir=sys.argv[2], steps=2, global_batch=8, micro_batch=4, lr=1e-3, warmup=1,
                          precision="fp32", eval_every=0, eval_iters=None, eval_batch=4, save_every=0, log_every=1,
                          num_workers=0, device="cpu", progress=False, fsdp=True, save_final=False)
        train(uneven_eval_task(int(sys.argv[3])), cfg)
        exit_process(0)
    # args: DATA VOCAB OUT [ddp|fsdp|fsdp-bf16] [STOP_AT] [LOAD]
    data_dir, vocab_size, out_dir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    mode = sys.argv[4] if len(sys.argv) > 4 else "ddp"
    stop_at = int(sys.argv[5]) if len(sys.argv) > 5 and sys.argv[5] != "-" else None
    load = sys.argv[6] if len(sys.argv) > 6 else None
    bf16 = mode.endswith("bf16")     # fsdp-bf16: also 2 micro-batches per rank (accumulation under FSDP)
    cfg = TrainConfig(out_dir=out_dir, steps=4, global_batch=8, micro_batch=2 if bf16 else 4, lr=1e-3, warmup=1,
                      precision="bf16" if bf16 else "fp32", eval_every=0, eval_iters=1, save_every=0, log_every=1,
                      num_workers=0, device="cpu", progress=False, fsdp=mode.startswith("fsdp"), stop_at=stop_at,
                      load=load)
    seen: set = set()
    train(record_gathered_dtype(tiny_task(data_dir, vocab_size), seen), cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        with open(os.path.join(out_dir, "gathered_dtypes.json"), "w") as f:
            json.dump(sorted(seen), f)
    exit_process(0)
