"""The fast tier on an accelerator, and the host RAM tier that feeds it.

On a CUDA device the store's slot pool lives in device memory, and an expert reaches its slot in two moves: from
the slow tier into host memory (pinned: the copy to the device runs without staging through pageable pages), then
to the device on a side stream of the reading thread, so the compute stream never waits for a copy it did not ask
for. Where host RAM holds every expert, the slow tier *is* host RAM (`HostExperts`, the set-up of llama.cpp's
`--n-cpu-moe` and of mixtral-offloading): every expert is read from the checkpoint once, at start, and a miss
costs one host-to-device copy instead of a disk read. Where it does not, each read goes from disk into a pinned
staging buffer of the reading thread, then up.

A slot's old contents may still be in use by kernels the compute stream has queued but not run (CUDA launches
are asynchronous): the store calls `release(slots)` when a forward pass lets go of them, which records an event on
the compute stream, and an upload into such a slot first makes its side stream wait for that event.

On the CPU the same class does plain copies (no stream, no event, no pinning): the store uses it there only where
it is asked to, in tests, so that every step of the device path except CUDA's own calls runs on this host.

Legend: S=slots, I=expert intermediate size, H=hidden size, N=experts of all MoE layers.
"""

from __future__ import annotations

import threading

import torch

from marserve.experts.policies import Key


def host_empty(shape: tuple[int, ...], dtype: torch.dtype, pinned: bool) -> torch.Tensor:
    """Host memory for copies to a device: page-locked when `pinned` (a CUDA device), plain otherwise."""
    return torch.empty(shape, dtype=dtype, pin_memory=pinned)


class DeviceTransfer:
    """Copies experts from host memory into the slots w13 [S,2I,H] / w2 [S,H,I] (on their device)."""

    def __init__(self, w13: torch.Tensor, w2: torch.Tensor):
        self.w13, self.w2 = w13, w2
        self.cuda = w13.device.type == "cuda"
        self._local = threading.local()  # per reading thread: its staging buffers and side stream
        self._lock = threading.Lock()
        self._released: dict[int, object] = {}  # slot -> the compute stream's event after its last use

    def staging(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This thread's host buffers for one expert ([2I,H], [H,I] in the slots' dtype), made on first use."""
        bufs = getattr(self._local, "staging", None)
        if bufs is None:
            bufs = self._local.staging = (host_empty(tuple(self.w13.shape[1:]), self.w13.dtype, self.cuda),
                                          host_empty(tuple(self.w2.shape[1:]), self.w2.dtype, self.cuda))
        return bufs

    def upload(self, slot: int, w13: torch.Tensor, w2: torch.Tensor) -> None:
        """Copy one expert's host rows into `slot`; returns once they are on the device."""
        if not self.cuda:
            self.w13[slot].copy_(w13)
            self.w2[slot].copy_(w2)
            return
        stream = getattr(self._local, "stream", None)
        if stream is None:
            stream = self._local.stream = torch.cuda.Stream(device=self.w13.device)
        with self._lock:
            last_use = self._released.pop(slot, None)
        with torch.cuda.stream(stream):
            if last_use is not None:
                stream.wait_event(last_use)  # kernels queued on the old contents run first
            self.w13[slot].copy_(w13, non_blocking=True)
            self.w2[slot].copy_(w2, non_blocking=True)
        stream.synchronize()  # this reading thread waits; the compute stream does not

    def release(self, slots: list[int]) -> None:
        """A forward pass let go of these slots (its kernels on them are queued): mark where the compute stream
        is, for an upload into one of them to wait for."""
        if not self.cuda or not slots:
            return
        event = torch.cuda.Event()
        event.record()  # on the calling thread's current stream: the one its kernels went to
        with self._lock:
            for s in slots:
                self._released[s] = event


class HostExperts:
    """Every expert of the model in host memory (pinned for a CUDA device), filled once at start: the slow tier
    when host RAM holds them all."""

    def __init__(self, keys: list[Key], w13_shape: tuple[int, ...], w2_shape: tuple[int, ...], dtype: torch.dtype,
                 pinned: bool):
        self.row_of = {k: i for i, k in enumerate(keys)}
        n = len(keys)
        self.w13 = host_empty((n, *w13_shape), dtype, pinned)  # [N, 2I, H]
        self.w2 = host_empty((n, *w2_shape), dtype, pinned)  # [N, H, I]

    def rows(self, key: Key) -> tuple[torch.Tensor, torch.Tensor]:
        i = self.row_of[key]
        return self.w13[i], self.w2[i]

    @property
    def nbytes(self) -> int:
        return self.w13.numel() * self.w13.element_size() + self.w2.numel() * self.w2.element_size()
