"""The expert store under a real (baby) checkpoint: misses read the right bytes into a slot, prefetches land and count
as hits, a fetch waits for a read in flight instead of reading twice, reads leave no page cache behind, a corrupt read
is read again and a persistent one is an error naming the file and tensor; bf16 files convert to fp32 slots. Each
runs with both read paths: O_DIRECT (the default) and the page-cache one (for filesystems that refuse O_DIRECT)."""

import ctypes
import gc
import mmap
import os
import re
import shutil
import threading
import time

import pytest
import torch

from marserve.errors import CheckpointError
from marserve.loader import load_model
from tests.experts.checkpoints import SIZES


@pytest.fixture(params=["direct", "page-cache"])
def io_path(request, monkeypatch):
    """The slow tier's read path: O_DIRECT, or the page cache dropped after each read."""
    from marserve.experts import slow_tier
    monkeypatch.setattr(slow_tier, "USE_DIRECT_IO", request.param == "direct")
    return request.param


@pytest.fixture
def offloaded(baby_checkpoint, io_path):
    """(model at the minimum budget with lru, the resident model) of a mixtral baby."""
    path = baby_checkpoint("mixtral", **SIZES)
    model, _ = load_model(path, dtype="float32", expert_cache=0.25, expert_policy="lru")
    resident, _ = load_model(path, dtype="float32")
    yield model, resident
    model.expert_store.close()


def _absent(store, layer):
    resident = store.resident_keys()
    return [e for e in range(8) if (layer, e) not in resident]


def _assert_weights(ew, ids, resident_block):
    w13, w2 = resident_block.experts.resident()
    for e, slot in zip(ids.reshape(-1).tolist(), ew.topk_ids.reshape(-1).tolist()):
        torch.testing.assert_close(ew.w13[slot], w13[e], rtol=0, atol=0)
        torch.testing.assert_close(ew.w2[slot], w2[e], rtol=0, atol=0)


def test_a_miss_reads_the_expert_and_a_second_fetch_hits(offloaded):
    model, resident = offloaded
    store, block = model.expert_store, model.moe_blocks()[1]
    e = _absent(store, 1)[0]
    ids = torch.tensor([[e, e]])
    ew = block.experts.fetch(ids)
    _assert_weights(ew, ids, resident.moe_blocks()[1])
    s = block.experts.stats
    assert (s.lookups, s.misses, s.hits) == (2, 2, 0)
    assert s.bytes_moved == store.index.file_bytes(1, e) and s.stall_seconds > 0
    block.experts.fetch(torch.tensor([[e]]))
    assert (s.lookups, s.misses, s.hits) == (3, 2, 1)


def _wait_resident(store, key):
    deadline = time.monotonic() + 30
    while key not in store.resident_keys():
        assert time.monotonic() < deadline, f"{key} never landed"
        time.sleep(0.01)


@pytest.mark.parametrize("tokens", [1, 40])  # 2 ids (remapped through a list) and 80 (through a lookup tensor)
def test_fetch_remaps_every_routing_id_to_its_experts_slot(offloaded, tokens):
    model, resident = offloaded
    block = model.moe_blocks()[3]
    ids = torch.tensor([[(t + k) % 2 * 5, (t * 3 + k) % 8] for t in range(tokens) for k in range(1)])
    assert ids.numel() == 2 * tokens
    ew = block.experts.fetch(ids)
    assert ew.topk_ids.shape == ids.shape and ew.topk_ids.dtype == ids.dtype
    _assert_weights(ew, ids, resident.moe_blocks()[3])


def test_a_prefetched_expert_is_a_hit_and_a_prefetch_hit(offloaded):
    model, resident = offloaded
    store, block = model.expert_store, model.moe_blocks()[2]
    e = _absent(store, 2)[0]
    block.experts.prefetch(torch.tensor([e]))
    _wait_resident(store, (2, e))
    ids = torch.tensor([[e]])
    _assert_weights(block.experts.fetch(ids), ids, resident.moe_blocks()[2])
    s = block.experts.stats
    assert (s.prefetches, s.prefetch_hits, s.misses, s.hits) == (1, 1, 0, 1)
    block.experts.prefetch(torch.tensor([e]))  # resident already: nothing to do
    assert s.prefetches == 1


def test_a_prefetch_does_not_displace_an_unused_prefetch_but_a_miss_does(offloaded):
    model, resident = offloaded
    store, blocks = model.expert_store, model.moe_blocks()
    held = sorted(store.resident_keys())[0]
    blocks[held[0]].experts.fetch(torch.tensor([[held[1]]]))  # pinned until this thread's next fetch
    absent = [(layer, e) for layer in range(4) for e in _absent(store, layer)]
    guesses = absent[:store.num_slots - 1]  # every other slot ends up holding an unused prefetch
    for layer, e in guesses:
        blocks[layer].experts.prefetch(torch.tensor([e]))
        _wait_resident(store, (layer, e))
    layer, e = absent[store.num_slots - 1]
    blocks[layer].experts.prefetch(torch.tensor([e]))  # its only victims are earlier guesses: dropped
    assert sum(b.experts.stats.prefetches for b in blocks) == len(guesses)
    assert set(guesses) <= store.resident_keys() and (layer, e) not in store.resident_keys()
    ids = torch.tensor([[e]])  # a fetch that needs it reads it all the same
    _assert_weights(blocks[layer].experts.fetch(ids), ids, resident.moe_blocks()[layer])
    assert blocks[layer].experts.stats.misses == 1 and (layer, e) in store.resident_keys()


def test_a_prefetch_waits_while_the_forecast_wants_every_victim_sooner(offloaded):
    model, resident = offloaded
    store, blocks = model.expert_store, model.moe_blocks()
    held = store.resident_keys()
    for layer in range(4):  # every resident expert is forecast for fetch 2
        store.expect(layer, {e: [2] for l, e in held if l == layer})
    layer, e = next((layer, e) for layer in range(4) for e in _absent(store, layer))
    store.expect(layer, {**{x: [2] for l, x in held if l == layer}, e: [5]})
    assert blocks[layer].experts.prefetch(torch.tensor([e])) == 1  # its victim would be wanted first: not started
    assert store.reads_in_flight == 0 and store.resident_keys() == held
    store.expect(layer, {**{x: [2] for l, x in held if l == layer}, e: [1]})  # now wanted before any of them
    assert blocks[layer].experts.prefetch(torch.tensor([e])) == 0
    _wait_resident(store, (layer, e))
    assert blocks[layer].experts.stats.prefetches == 1


def test_a_fetch_waits_for_the_read_in_flight(offloaded):
    model, resident = offloaded
    store, block = model.expert_store, model.moe_blocks()[0]
    e = _absent(store, 0)[0]
    go, reads = threading.Event(), []

    def hold(piece, view):
        reads.append(piece)
        if threading.current_thread().name.startswith("expert-read"):
            go.wait(30)

    store.fault_hook = hold
    block.experts.prefetch(torch.tensor([e]))
    result = {}
    fetcher = threading.Thread(target=lambda: result.setdefault("ew", block.experts.fetch(torch.tensor([[e]]))))
    fetcher.start()
    fetcher.join(0.3)
    assert fetcher.is_alive()  # blocked on the prefetch's read, not reading on its own
    go.set()
    fetcher.join(30)
    _assert_weights(result["ew"], torch.tensor([[e]]), resident.moe_blocks()[0])
    assert len(reads) == len(store.index.pieces[0][e])  # each piece read once
    assert block.experts.stats.misses == 0 and block.experts.stats.prefetch_hits == 1


def _flip_first(n, tensor=""):
    """A fault hook that damages the first n reads (one bit each) of pieces whose tensor name contains `tensor`."""
    left = [n]

    def hook(piece, view):
        if left[0] > 0 and tensor in piece.tensor:
            left[0] -= 1
            view[0] ^= 0x01
    return hook


def test_a_corrupt_read_is_read_again(offloaded, caplog):
    model, resident = offloaded
    store, block = model.expert_store, model.moe_blocks()[3]
    e = _absent(store, 3)[0]
    store.fault_hook = _flip_first(1)
    ids = torch.tensor([[e]])
    _assert_weights(block.experts.fetch(ids), ids, resident.moe_blocks()[3])
    assert "wrong checksum" in caplog.text


def test_a_persistent_corruption_names_file_and_tensor(offloaded):
    model, resident = offloaded
    store, block = model.expert_store, model.moe_blocks()[3]
    e = _absent(store, 3)[0]
    store.fault_hook = _flip_first(2, f".experts.{e}.w1.")  # the read and its retry
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: expert tensor model\.layers\.3\.block_sparse_moe"
                                              rf"\.experts\.{e}\.w1\.weight .* read back twice"):
        block.experts.fetch(torch.tensor([[e]]))
    assert (3, e) not in store.resident_keys()
    ids = torch.tensor([[e]])  # the slot was given back; the next read is clean
    _assert_weights(block.experts.fetch(ids), ids, resident.moe_blocks()[3])


def _cached_pages(path, offset, nbytes):
    """How many pages of [offset, offset + nbytes) of a file sit in the page cache (mincore on a fresh mapping)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    page = mmap.PAGESIZE
    start = offset // page * page
    length = offset + nbytes - start
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, start)
        assert addr not in (None, ctypes.c_void_p(-1).value)
        vec = ctypes.create_string_buffer((length + page - 1) // page)
        assert libc.mincore(addr, length, vec) == 0
        libc.munmap(addr, length)
    finally:
        os.close(fd)
    return sum(b & 1 for b in vec.raw)


def test_reads_leave_no_page_cache_behind(baby_checkpoint, io_path):
    # Alone in its model (no resident twin): pages a live mmap of the file maps stay cached whatever one advises.
    path = baby_checkpoint("mixtral", **SIZES)
    fd = os.open(path / "model.safetensors", os.O_RDONLY)
    os.fsync(fd)  # just written: dirty pages are never dropped, whatever one advises
    os.close(fd)
    gc.collect()  # the earlier tests' resident models map the file
    model, _ = load_model(path, dtype="float32", expert_cache=0.25)
    assert not [m for m in open("/proc/self/maps") if str(path) in m]  # nothing maps the file any more
    store, block = model.expert_store, model.moe_blocks()[1]
    e, e2, e3 = _absent(store, 1)[:3]
    pieces = store.index.pieces[1][e]
    probe = store.index.pieces[1][e3][0]
    with open(probe.path, "rb") as f:  # a plain read of another expert does fill the cache: the probe works
        f.seek(probe.offset)
        f.read(probe.nbytes)
        assert _cached_pages(probe.path, probe.offset, probe.nbytes) > 0
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # and readahead cached its neighbours: drop all
    assert _cached_pages(pieces[0].path, pieces[0].offset, pieces[0].nbytes) == 0
    block.experts.fetch(torch.tensor([[e, e2]]))
    for p in pieces + store.index.pieces[1][e2]:
        assert _cached_pages(p.path, p.offset, p.nbytes) == 0
    store.close()


def test_bf16_file_fills_fp32_slots(baby_checkpoint, io_path):
    path = baby_checkpoint("mixtral", dtype="bfloat16", **SIZES)
    model, _ = load_model(path, dtype="float32", expert_cache=0.5)
    resident, _ = load_model(path, dtype="float32")
    store = model.expert_store
    assert store.w13.dtype == torch.float32
    e = _absent(store, 0)[0]
    ids = torch.tensor([[e]])
    _assert_weights(model.moe_blocks()[0].experts.fetch(ids), ids, resident.moe_blocks()[0])
    assert model.moe_blocks()[0].experts.stats.bytes_moved == store.index.file_bytes(0, e)  # bf16 bytes read
    store.close()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_runs_larger_than_the_staging_buffer_are_read_in_chunks(baby_checkpoint, io_path, monkeypatch, dtype):
    # a Mixtral-8x7B expert is 352 MB: it goes through a reader's staging buffer in pieces, checksummed across them
    from marserve.experts import slow_tier
    monkeypatch.setattr(slow_tier, "STAGING_BYTES", 3 * 4096)  # an expert's run here is 24 KiB (fp32)
    path = baby_checkpoint("mixtral", dtype=dtype, **SIZES)
    model, _ = load_model(path, dtype="float32", expert_cache=0.25)
    resident, _ = load_model(path, dtype="float32")
    store, block = model.expert_store, model.moe_blocks()[1]
    calls = []
    real = os.preadv
    monkeypatch.setattr(slow_tier.os, "preadv", lambda fd, bufs, off: calls.append(off) or real(fd, bufs, off))
    e, e2 = _absent(store, 1)[:2]
    ids = torch.tensor([[e, e2]])
    _assert_weights(block.experts.fetch(ids), ids, resident.moe_blocks()[1])
    assert len(calls) >= 2 * (store.index.file_bytes(1, e) // (3 * 4096))  # several reads per expert
    e3 = _absent(store, 1)[0]
    store.fault_hook = _flip_first(1, f".experts.{e3}.w3.")  # a damaged chunk is still caught
    ids = torch.tensor([[e3]])
    _assert_weights(block.experts.fetch(ids), ids, resident.moe_blocks()[1])
    assert store.slow.rereads == 1
    store.close()


@pytest.fixture
def queued(monkeypatch):
    """Chunks small enough that a baby's expert (24 KiB in fp32) goes through the disk queue in several reads."""
    from marserve.experts import slow_tier
    monkeypatch.setattr(slow_tier, "PIPE_CHUNK", 2 * 4096)


@pytest.fixture(params=["whole runs", "queued chunks"])
def chunking(request):
    """An O_DIRECT run read as one request, or in chunks through the disk queue (each has its own error paths)."""
    if request.param == "queued chunks":
        request.getfixturevalue("queued")
    return request.param


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_chunks_through_the_disk_queue_land_whole_and_checked(baby_checkpoint, queued, monkeypatch, dtype):
    from marserve.experts import slow_tier
    path = baby_checkpoint("mixtral", dtype=dtype, **SIZES)
    model, _ = load_model(path, dtype="float32", expert_cache=0.25)
    resident, _ = load_model(path, dtype="float32")
    store, block = model.expert_store, model.moe_blocks()[1]
    calls, threads = [], set()
    real = os.preadv

    def counting(fd, bufs, off):
        calls.append(off)
        threads.add(threading.current_thread().name)
        return real(fd, bufs, off)
    monkeypatch.setattr(slow_tier.os, "preadv", counting)
    e, e2 = _absent(store, 1)[:2]
    ids = torch.tensor([[e, e2]])
    _assert_weights(block.experts.fetch(ids), ids, resident.moe_blocks()[1])
    assert len(calls) >= 2 * (store.index.file_bytes(1, e) // (2 * 4096))  # several chunks per expert
    assert threads and all(name.startswith("expert-disk") for name in threads)  # read by the queue's threads
    e3 = _absent(store, 1)[0]
    store.fault_hook = _flip_first(1, f".experts.{e3}.w2.")  # a damaged chunk is caught and read again
    ids = torch.tensor([[e3]])
    _assert_weights(block.experts.fetch(ids), ids, resident.moe_blocks()[1])
    assert store.slow.rereads == 1
    store.close()


def test_a_truncated_file_names_the_file_and_the_tensor(baby_checkpoint, io_path, chunking, tmp_path):
    path = tmp_path / "model"
    shutil.copytree(baby_checkpoint("mixtral", **SIZES), path)  # the session's shared baby stays whole
    model, _ = load_model(path, dtype="float32", expert_cache=0.25)
    store = model.expert_store
    layer = max(store.index.pieces)
    e = max(range(8), key=lambda e: store.index.pieces[layer][e][-1].offset)  # the expert nearest the file's end
    if (layer, e) in store.resident_keys():
        pytest.skip("the last expert in the file is resident")
    last = max(store.index.pieces[layer][e], key=lambda p: p.offset)
    os.truncate(last.path, last.offset + 100)
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: truncated safetensors file \(expert tensor "
                                              rf"{re.escape(last.tensor)} is cut short"):
        model.moe_blocks()[-1].experts.fetch(torch.tensor([[e]]))
    assert (layer, e) not in store.resident_keys()  # the slot was given back
    store.close()


def test_an_experts_adjacent_tensors_are_one_read(offloaded, monkeypatch):
    model, resident = offloaded
    store, block = model.expert_store, model.moe_blocks()[2]
    e = _absent(store, 2)[0]
    assert len(store.index.pieces[2][e]) == 3  # w1, w2, w3: back to back in the file
    from marserve.experts import slow_tier
    calls = []
    real = os.preadv
    monkeypatch.setattr(slow_tier.os, "preadv", lambda fd, bufs, off: calls.append(len(bufs)) or real(fd, bufs, off))
    ids = torch.tensor([[e]])
    _assert_weights(block.experts.fetch(ids), ids, resident.moe_blocks()[2])
    assert len(calls) == 1  # one request (three destinations, or one staging buffer under O_DIRECT)


def test_the_read_path_is_the_one_asked_for(offloaded, io_path):
    import fcntl
    model, resident = offloaded
    store, block = model.expert_store, model.moe_blocks()[0]
    e = _absent(store, 0)[0]
    ids = torch.tensor([[e]])
    _assert_weights(block.experts.fetch(ids), ids, resident.moe_blocks()[0])
    (fd, direct), = store.slow._files.values()
    assert direct == (io_path == "direct") and bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT) == direct


def test_a_filesystem_refusing_o_direct_falls_back_to_the_page_cache(offloaded, chunking, monkeypatch, caplog):
    # tmpfs and some network filesystems answer O_DIRECT with EINVAL, at open or at the first read
    from marserve.experts import slow_tier
    model, resident = offloaded
    store, block = model.expert_store, model.moe_blocks()[2]
    real = os.preadv

    def refuse(fd, bufs, off):
        if fcntl_flags(fd) & os.O_DIRECT:
            raise OSError(22, "Invalid argument")
        return real(fd, bufs, off)
    monkeypatch.setattr(slow_tier.os, "preadv", refuse)
    e = _absent(store, 2)[0]
    ids = torch.tensor([[e]])
    _assert_weights(block.experts.fetch(ids), ids, resident.moe_blocks()[2])
    (fd, direct), = store.slow._files.values()
    assert not direct and not fcntl_flags(fd) & os.O_DIRECT


def fcntl_flags(fd):
    import fcntl
    return fcntl.fcntl(fd, fcntl.F_GETFL)


def test_the_store_tells_the_policy_which_layer_it_fetches(offloaded):
    # the policy's layer order (mar's distance to a layer's next fetch) comes from here
    model, _ = offloaded
    for block in model.moe_blocks()[::-1]:
        block.experts.fetch(torch.tensor([[0]]))
        assert model.expert_store.policy.layer == block.layer_idx


def test_a_fetchs_misses_are_read_side_by_side(offloaded):
    model, resident = offloaded
    store, block = model.expert_store, model.moe_blocks()[2]
    a, b = _absent(store, 2)[:2]
    both = threading.Barrier(2, timeout=10)  # broken (and the fetch fails) if the reads come one after another
    first_piece = {(2, a): store.index.pieces[2][a][0], (2, b): store.index.pieces[2][b][0]}

    def meet(piece, view):
        if piece in first_piece.values():
            both.wait()

    store.fault_hook = meet
    ids = torch.tensor([[a, b]])
    _assert_weights(block.experts.fetch(ids), ids, resident.moe_blocks()[2])
    assert block.experts.stats.misses == 2 and not both.broken


def test_a_failed_miss_among_several_gives_every_slot_back_and_raises(offloaded):
    model, resident = offloaded
    store, block = model.expert_store, model.moe_blocks()[3]
    a, b = _absent(store, 3)[:2]
    store.fault_hook = _flip_first(2, f".experts.{b}.w1.")  # b's read and its retry: b fails, a lands
    with pytest.raises(CheckpointError, match=rf"experts\.{b}\.w1\.weight .* read back twice"):
        block.experts.fetch(torch.tensor([[a, b]]))
    assert store.in_use()[0] == 0  # no read left in flight
    assert (3, b) not in store.resident_keys()
    store.end_pass()
    ids = torch.tensor([[a, b]])
    _assert_weights(block.experts.fetch(ids), ids, resident.moe_blocks()[3])


def test_the_store_measures_its_reads_and_how_busy_they_keep_the_disk(offloaded):
    # the prefetcher's price of a wrong guess: one read, as often as reads are in flight to queue behind it
    model, _ = offloaded
    store, block = model.expert_store, model.moe_blocks()[0]
    assert store.wrong_guess_seconds() == 0.0  # nothing read since start
    e = _absent(store, 0)[0]
    block.experts.fetch(torch.tensor([[e]]))  # a miss: a read in flight through this fetch
    block.experts.fetch(torch.tensor([[e]]))  # a hit, which samples the time since the last fetch
    assert store.read_seconds > 0 and 0 < store.busy_share <= 1
    assert block.experts.wrong_guess_seconds() == store.read_seconds * store.busy_share > 0
    before = store.busy_share
    for _ in range(3):  # hits only: the disk idles and a wrong guess gets cheaper
        time.sleep(0.01)
        block.experts.fetch(torch.tensor([[e]]))
    assert store.busy_share < before
    assert store.in_use()[0] == 0
