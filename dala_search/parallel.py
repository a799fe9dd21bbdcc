"""The data-parallel helpers of a trial, as torchvision's reference scripts keep them in
``utils`` (``reduce_across_processes``): this process's rank, a sum over the ranks, rank
0's value on every rank. With one process (``world`` 1) each passes its value straight
through, so the training code reads the same alone and data parallel.
"""

from __future__ import annotations

from typing import Any

import torch


def rank_and_world(distributed: bool) -> tuple[int, int]:
    """This process's rank and the group size (0, 1 unless data parallel)."""
    if not distributed:
        return 0, 1
    if not torch.distributed.is_initialized():
        raise RuntimeError("train_trial(distributed=True) needs an initialised process group")
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def sum_across_processes(total: torch.Tensor, count: int, world: int) -> tuple[torch.Tensor, int]:
    """(``total``, ``count``) summed over the ranks: an epoch's loss and image count."""
    if world == 1:
        return total, count
    both = torch.stack([total, torch.tensor(float(count), device=total.device)])
    torch.distributed.all_reduce(both)
    return both[0], int(both[1].item())


def from_rank0(obj: Any, world: int) -> Any:
    """Rank 0's ``obj`` on every rank (a small picklable value: metrics, test scores).

    Every rank then reports, selects the best epoch and stops early on the same numbers.
    """
    if world == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]
