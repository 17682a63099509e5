"""This process among the ones `accelerate launch` started, and what the main one tells the others."""

from __future__ import annotations

def process_state():
    """This process's place among the ones `accelerate launch` (or torchrun) started.

    Without a GPU it asks for CPU, so several processes join with the gloo backend (the
    first PartialState of a process fixes this for the Trainer too).
    """
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def broadcast_from_main(value, state):
    """`value` from the main process, on every process."""
    if state.num_processes <= 1:
        return value
    from accelerate.utils import broadcast_object_list

    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]


def sync_parameters(parameters, state) -> None:
    """Every process starts from the main process's values of `parameters` (in place)."""
    if state.num_processes <= 1:
        return
    import torch.distributed as dist

    for parameter in parameters:
        dist.broadcast(parameter.data, src=0)


def average_gradients(parameters, state) -> None:
    """Replace each gradient by its mean over the processes: data-parallel training by hand, for
    the loops that do not go through a Trainer (align/ppo.py). Every process must call it for the
    same parameters, in the same order."""
    if state.num_processes <= 1:
        return
    import torch
    import torch.distributed as dist

    for parameter in parameters:
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
        dist.all_reduce(parameter.grad, op=dist.ReduceOp.SUM)
        parameter.grad /= state.num_processes


def mean_over_processes(values: list[float], state) -> list[float]:
    """Each value averaged over the processes (for metrics every process computed on its share)."""
    if state.num_processes <= 1:
        return values
    import torch
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return (tensor / state.num_processes).tolist()
