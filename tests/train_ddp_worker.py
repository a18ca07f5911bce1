"""Run by tests/test_train_ddp.py under ``torchrun --nproc_per_node=2``: a tiny fp32 pretraining run
(no dropout) whose per-step losses must equal single-process gradient accumulation, wrapped in DDP
or FSDP2, optionally stopped early (``STOP_AT``) or resumed (``LOAD``)."""
import sys

import torch

torch.set_num_threads(1)

from dslm.model import BertConfig  # noqa: E402
from dslm.train.engine import TrainConfig, train  # noqa: E402
from dslm.train.pretrain import PretrainTask  # noqa: E402


def tiny_task(data_dir, vocab_size):
    config = BertConfig(vocab_size=vocab_size, hidden_size=32, num_layers=2, num_heads=2, max_position_embeddings=64,
                        hidden_dropout=0.0, attention_dropout=0.0)
    return PretrainTask(data_dir, config, seq_len=32, seed=7, num_workers=0)


if __name__ == "__main__":
    # args: DATA VOCAB OUT [ddp|fsdp] [STOP_AT] [LOAD]
    data_dir, vocab_size, out_dir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    mode = sys.argv[4] if len(sys.argv) > 4 else "ddp"
    stop_at = int(sys.argv[5]) if len(sys.argv) > 5 and sys.argv[5] != "-" else None
    load = sys.argv[6] if len(sys.argv) > 6 else None
    cfg = TrainConfig(out_dir=out_dir, steps=4, global_batch=8, micro_batch=4, lr=1e-3, warmup=1, precision="fp32",
                      eval_every=0, eval_iters=1, save_every=0, log_every=1, num_workers=0, device="cpu",
                      progress=False, fsdp=mode == "fsdp", stop_at=stop_at, load=load)
    train(tiny_task(data_dir, vocab_size), cfg)
