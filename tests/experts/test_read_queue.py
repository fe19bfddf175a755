"""The slow tier's disk queue (marserve/experts/read_queue.py): reads land, errors reach the waiter, urgent reads
go before background ones not yet started, close() finishes what was queued."""

import os
import threading

import pytest

from marserve.experts.read_queue import ReadQueue


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "data.bin"
    path.write_bytes(bytes(range(256)) * 64)  # 16 KiB
    fd = os.open(path, os.O_RDONLY)
    yield fd
    os.close(fd)


def test_a_read_lands_in_its_buffer(data_file):
    q = ReadQueue(workers=2)
    buf = bytearray(100)
    assert q.submit(data_file, memoryview(buf), 300).result() == 100
    assert bytes(buf) == (bytes(range(256)) * 2)[300 - 256:300 - 256 + 100]
    q.close()


def test_a_failed_read_raises_in_the_waiter(data_file):
    q = ReadQueue(workers=1)
    with pytest.raises(OSError):
        q.submit(-1, memoryview(bytearray(8)), 0).result()
    assert q.submit(data_file, memoryview(bytearray(8)), 0).result() == 8  # the worker survives
    q.close()


def test_urgent_reads_go_before_queued_background_ones(data_file, monkeypatch):
    q = ReadQueue(workers=1)
    started, gate, order = threading.Event(), threading.Event(), []
    real = os.preadv

    def recording(fd, bufs, off):
        if fd != data_file:  # another test's store reading on its own threads
            return real(fd, bufs, off)
        if off == 0:
            started.set()
            gate.wait(5)  # the one worker is busy until the queue is full
        order.append(off)
        return real(fd, bufs, off)
    monkeypatch.setattr(os, "preadv", recording)
    first = q.submit(data_file, memoryview(bytearray(8)), 0, urgent=False)
    assert started.wait(5)  # the worker holds the first read (else a slow thread start lets 300 go first)
    jobs = [q.submit(data_file, memoryview(bytearray(8)), off, urgent=off >= 300) for off in (100, 200, 300, 400)]
    gate.set()
    for job in [first] + jobs:
        job.result()
    assert order == [0, 300, 400, 100, 200]  # urgent ones first, each kind in the order it came
    q.close()


def test_close_finishes_the_queued_reads_and_refuses_more(data_file):
    q = ReadQueue(workers=1)
    jobs = [q.submit(data_file, memoryview(bytearray(8)), 8 * i) for i in range(20)]
    q.close()
    assert all(j.result() == 8 for j in jobs)
    with pytest.raises(RuntimeError, match="closed"):
        q.submit(data_file, memoryview(bytearray(8)), 0)
