"""Run under torchrun by tests/test_distributed.py: one DistributedDataParallel step on this rank's half-batch."""

import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from pwself.distributed import gather_rows, init_distributed, shard_indices
from pwself.step import distill_step

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from test_distributed import half_views, one_step, setup  # noqa: E402

info = init_distributed("cpu")
student, teacher, objective, opt = setup()
ddp = DistributedDataParallel(student)
# A forward whose loss is dropped (a skipped non-finite step) must not break the next DDP step.
distill_step(ddp, teacher, objective, half_views(info.rank), 0.04)
one_step(ddp, teacher, objective, opt, ranks=[info.rank])
# Sharded rows come back complete and in order (no duplicates, no padding) for an odd count.
rows = shard_indices(7)
full = gather_rows(rows.float()[:, None] * 10, rows, 7)
assert torch.equal(full[:, 0], torch.arange(7).float() * 10), full
if info.rank == 0:
    torch.save({k: v.detach() for k, v in student.state_dict().items()}, sys.argv[1])
dist.barrier()
dist.destroy_process_group()
