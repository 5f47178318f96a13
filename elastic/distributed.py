"""Several processes over one evaluation: who does which sample, on which device, and waiting.

    accelerate launch --multi_gpu --num_processes 2 -m elastic.evaluate --device cpu ...   # 2 CPU processes
    accelerate launch --num_processes 8 -m elastic.evaluate ...                            # 8 GPUs
    torchrun --nproc_per_node 2 -m elastic.evaluate ...                                    # the same, torch's own

A plain ``python -m`` run is one process: :func:`state` then reports rank 0 of 1, :func:`shard`
keeps everything, :func:`wait` returns at once and :func:`gather` returns its input.
(``accelerate launch --cpu --num_processes 2`` starts one process, not two: accelerate only
starts several CPU processes through ``mpirun``; its ``--multi_gpu`` launcher is ``torchrun``
and works on CPUs too, see docs/evaluation.md.)
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch

# Processes wait at a barrier for the slowest. The shares differ by at most one sample of every
# variant, which on a CPU can outlast torch's default 30 minutes; a process that fails ends the
# others through the launcher, so a long timeout does not leave a failed run hanging.
TIMEOUT = timedelta(days=1)


def state(cpu: bool = False):
    """This process's :class:`accelerate.PartialState` (rank 0 of 1 without a launcher).

    Parameters
    ----------
    cpu : bool
        The processes run on CPUs and talk over gloo, even where CUDA is available. Without
        CUDA (or under ``accelerate launch --cpu``) this is always so: accelerate would
        otherwise see no distributed setting and every process would do all the work.
    """
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    cpu = cpu or parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()
    return PartialState(cpu=cpu, timeout=TIMEOUT)


def device(current, requested: str | None = None) -> str | None:
    """The device this process loads the model on.

    One process: ``requested`` as given. Several: each its own GPU (``cuda:LOCAL_RANK``) for
    ``None`` or ``"cuda"`` (which alone would spread every process's model over all GPUs),
    ``"cpu"`` on CPUs; an explicit ``"cuda:N"`` is kept.
    """
    if current.num_processes == 1 or (requested and requested != "cuda"):
        return requested
    return "cpu" if current.device.type == "cpu" else str(current.device)


def split_threads(current, total: int | None = None) -> int | None:
    """Give each process its share of this machine's CPU threads; returns it (None: one process).

    ``total`` defaults to the cores this process may run on. Launchers set
    ``OMP_NUM_THREADS=1`` for every process, which would leave most cores idle.
    """
    if current.num_processes == 1:
        return None
    local = int(os.environ.get("LOCAL_WORLD_SIZE", current.num_processes))
    cores = total or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    threads = max(1, cores // local)
    torch.set_num_threads(threads)
    return threads


def shard(items: list, current) -> list:
    """This process's share of ``items``: every ``world``-th one, from its rank on."""
    return list(items)[current.process_index::current.num_processes]


def wait(current) -> None:
    """Return when every process has come here."""
    current.wait_for_everyone()


def gather(shares: list, current) -> list:
    """Every process's :func:`shard` results back in the order of the items they came from."""
    if current.num_processes == 1:
        return list(shares)
    from accelerate.utils import gather_object

    world = current.num_processes
    indexed = [(current.process_index + world * i, x) for i, x in enumerate(shares)]
    return [x for _, x in sorted(gather_object(indexed), key=lambda pair: pair[0])]
