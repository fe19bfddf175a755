"""The slow tier's disk queue: block-aligned O_DIRECT reads of expert chunks, served by a few threads, the urgent
ones first.

Why a queue. One expert read as one request, then checksummed and copied into its slot, leaves the disk idle while
the CPU checks and copies (on the bench-shape model, 5.6 ms a 9.4 MB read against 4.5 ms for the bare request).
Split into chunks with several in flight, the disk reads chunk k+1 while the reading thread checks and copies
chunk k. And once reads are chunks in one queue, a fetch's misses (the forward pass is waiting for them) can go
before prefetches (nobody waits for those yet): a miss then waits for at most the chunks already in the disk's
hands, instead of sharing the disk with whole prefetches for the length of its read.

The queue knows nothing of experts: a job is (fd, buffer, file offset), read with one preadv; jobs of equal
urgency run in the order they came.
"""

from __future__ import annotations

import heapq
import itertools
import os
import threading

URGENT, BACKGROUND = 0, 1


class ReadJob:
    """One queued read; result() waits for it -> bytes read, or raises the read's OSError."""

    __slots__ = ("fd", "buf", "offset", "_done", "_got", "_error")

    def __init__(self, fd: int, buf: memoryview, offset: int):
        self.fd, self.buf, self.offset = fd, buf, offset
        self._done = threading.Event()
        self._got, self._error = 0, None

    def result(self) -> int:
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self._got

    def _run(self) -> None:
        try:
            self._got = os.preadv(self.fd, [self.buf], self.offset)
        except BaseException as e:  # noqa: BLE001 - handed to the waiting reader
            self._error = e
        self._done.set()


class ReadQueue:
    def __init__(self, workers: int = 4):
        """workers: reads in the disk's hands at once (threads started on first use)."""
        self.workers = workers
        self._heap: list[tuple[int, int, ReadJob]] = []
        self._order = itertools.count()
        self._cond = threading.Condition()
        self._threads: list[threading.Thread] = []
        self._closed = False

    def submit(self, fd: int, buf: memoryview, offset: int, urgent: bool = True) -> ReadJob:
        """Queue preadv(fd, [buf], offset) -> its job. Urgent jobs go before background ones not yet started."""
        job = ReadJob(fd, buf, offset)
        with self._cond:
            if self._closed:
                raise RuntimeError("expert read queue is closed")
            heapq.heappush(self._heap, (URGENT if urgent else BACKGROUND, next(self._order), job))
            if len(self._threads) < self.workers:
                t = threading.Thread(target=self._serve, name=f"expert-disk-{len(self._threads)}", daemon=True)
                self._threads.append(t)
                t.start()
            self._cond.notify()
        return job

    def _serve(self) -> None:
        while True:
            with self._cond:
                while not self._heap and not self._closed:
                    self._cond.wait()
                if not self._heap:
                    return
                job = heapq.heappop(self._heap)[2]
            job._run()

    def close(self) -> None:
        """Finish the queued reads, then stop the threads."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            threads, self._threads = self._threads, []
        for t in threads:
            t.join()
