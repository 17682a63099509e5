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
