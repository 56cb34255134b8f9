"""Periodic checkpoints written in the background (``train --async-checkpoint``).

A synchronous checkpoint stops training for as long as the file takes to write: a 7B model's
weights and AdamW moments are about 84 GB, a minute or more of disk time every ``--save-every``
steps. As torchtitan's asynchronous checkpointing does, the writer instead takes a snapshot of
every tensor of the checkpoint in host memory (the GPU-to-host copies, and under FSDP or the other
splits the gathers, which are collectives, all happen here, in the training thread), then lets a
background thread write the snapshot while the next steps run. The file is the one a synchronous
save writes, written the same way (a temporary file, fsync, rename), so a reader never sees half a
checkpoint.

Costs and rules:
* host memory: the snapshot holds the whole checkpoint (12 bytes per parameter with fp32 AdamW
  moments) until its write ends; rank 0 only, under torchrun.
* one write at a time: the next checkpoint first waits for the previous one.
* the run's final ``model.apr`` and ``best.apr`` are written before the run goes on or ends.
* a failed background write fails the run at the next checkpoint or at its end, with the file and
  the error named (under torchrun every rank raises, as for a synchronous save).
* ``--keep-last`` deletes old checkpoints only among those already on disk, so a write in flight
  never costs one (until it lands there is one more checkpoint than asked for).
"""

from __future__ import annotations

import threading

import torch


class CheckpointWriter:
    """The ``write(tensors, path, metadata)`` that ``checkpoint.save_checkpoint`` ends with: with
    ``background`` a snapshot now and the file written by a thread (``write``), or the plain
    ``apr_kernels.save`` (``write_now``, which also waits for a write in flight first).

    ``host_state``: whether the trained tensors live in host memory (a CPU run), where a tensor's
    host copy can be the tensor itself: the snapshot then clones it, so the next steps cannot
    change what is being written."""

    def __init__(self, background: bool, host_state: bool = False):
        self.background, self.host_state = background, host_state
        self._thread: threading.Thread | None = None
        self._failed: tuple[str, BaseException] | None = None

    @classmethod
    def of(cls, background: bool, trainer) -> "CheckpointWriter":
        """The writer of ``trainer``'s run (a CPU run's tensors are their own host copies: cloned)."""
        return cls(background, host_state=trainer.device.type == "cpu")

    def for_step(self, final: bool):
        """(the ``write`` of a step checkpoint, its log record's extra keys): in the background unless
        it is the run's last file."""
        if final or not self.background:
            return self.write_now, {}
        return self.write, {"background": True}

    def write(self, tensors, path, metadata) -> None:
        if not self.background:
            return self.write_now(tensors, path, metadata)
        self.wait()  # (one write at a time; and the last one's failure is raised here)
        snapshot = {name: self._host(value) for name, value in tensors.items()}
        self._thread = threading.Thread(target=self._run, args=(snapshot, path, metadata), daemon=False,
                                        name=f"checkpoint {path}")
        self._thread.start()

    def write_now(self, tensors, path, metadata) -> None:
        import apr_kernels

        self.wait()
        apr_kernels.save(tensors, path, metadata=metadata)

    def wait(self) -> None:
        """Until the write in flight (if any) is on disk; raises RuntimeError naming the file if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._failed is not None:
            path, exc = self._failed
            self._failed = None
            raise RuntimeError(f"{path}: the background checkpoint write failed: {type(exc).__name__}: {exc}") \
                from exc

    def join(self) -> None:
        """Until the write in flight (if any) ends, raising nothing (``wait`` raises its failure)."""
        if self._thread is not None:
            self._thread.join()

    def _host(self, value):
        from apr_kernels.io import LazyTensor

        if isinstance(value, LazyTensor):  # (a host copy made now: under FSDP a gather all ranks join)
            value = value.materialize()
        if isinstance(value, torch.Tensor):
            if value.device.type != "cpu":
                return value.to("cpu")
            if self.host_state:
                return value.clone()
        return value

    def _run(self, snapshot, path, metadata) -> None:
        import apr_kernels

        try:
            apr_kernels.save(snapshot, path, metadata=metadata)
        except BaseException as exc:  # (raised in the training thread by wait())
            self._failed = (str(path), exc)
