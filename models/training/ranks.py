"""Error agreement across ranks: bad input found on one process stops every process with the same message.

Under torchrun a rank that raised alone would leave the others waiting in their next collective; here the
lowest failing rank's message is shared, so rank 0 prints it and every rank exits with it.
"""
from __future__ import annotations

from models.training.errors import InputError


def share_error(accelerator, message: str | None) -> None:
    """Collective: when any process has an error ``message``, every process raises it as InputError.

    The lowest failing rank's message is broadcast (as bytes in a tensor), so rank 0 can print it and no
    process is left waiting in a collective for a peer that has exited."""
    if accelerator.num_processes == 1:
        if message is not None:
            raise InputError(message)
        return
    import torch
    import torch.distributed as dist

    world, device = accelerator.num_processes, accelerator.device
    first = torch.tensor([accelerator.process_index if message is not None else world], device=device)
    dist.all_reduce(first, op=dist.ReduceOp.MIN)
    source = int(first.item())
    if source == world:
        return
    buffer = torch.zeros(2048, dtype=torch.uint8, device=device)
    if accelerator.process_index == source:
        data = message.encode("utf-8")[:buffer.numel()]
        buffer[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)
    dist.broadcast(buffer, src=source)
    raise InputError(bytes(buffer.cpu().tolist()).rstrip(b"\0").decode("utf-8", "replace"))


def agreed(accelerator, fn, *args, main_first: bool = False, **kwargs):
    """``fn(*args, **kwargs)`` on every process; bad input on any process is every process's InputError.

    ``main_first``: the main process runs first (it may download or build caches), then the others."""
    from models.checkpoints.weights import CheckpointError

    def attempt():
        try:
            return fn(*args, **kwargs), None
        except InputError as err:
            return None, str(err)
        except (CheckpointError, OSError, ValueError) as err:
            return None, str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__

    if main_first and accelerator.num_processes > 1:
        result, message = attempt() if accelerator.is_main_process else (None, None)
        share_error(accelerator, message)
        if not accelerator.is_main_process:
            result, message = attempt()
        share_error(accelerator, message)
        return result
    result, message = attempt()
    share_error(accelerator, message)
    return result

