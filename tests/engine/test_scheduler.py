from marserve.engine.block_manager import BlockManager
from marserve.sampling_params import SamplingParams
from marserve.engine.scheduler import Scheduler
from marserve.engine.sequence import Sequence, SequenceStatus


def make(num_blocks=32, block_size=4, max_num_seqs=8, budget=64, prefix=False):
    return Scheduler(BlockManager(num_blocks, block_size, enable_prefix_caching=prefix),
                     max_num_seqs=max_num_seqs, max_num_batched_tokens=budget)


def seq(i, n, start=0):
    return Sequence(seq_id=i, request_id=str(i), prompt_token_ids=list(range(start, start + n)),
                    params=SamplingParams())


def step(s, new_token=7):
    """One engine step without a model: schedule, mark computed, append a token where logits were due."""
    out = s.schedule()
    s.update(out)
    for sq, chunk in zip(out.seqs, out.chunks):
        if chunk.needs_logits:
            sq.output_token_ids.append(new_token)
    return out


def test_token_budget_and_chunked_prefill():
    s = make(budget=10)
    a, b = seq(0, 8), seq(1, 8, start=100)
    s.add(a), s.add(b)
    out = step(s)
    assert [len(c.token_ids) for c in out.chunks] == [8, 2]  # b's prompt is chunked
    assert [c.needs_logits for c in out.chunks] == [True, False]
    out = step(s)
    # decodes first (a: 1 token), then the rest of b's prompt
    assert out.seqs == [a, b] and [len(c.token_ids) for c in out.chunks] == [1, 6]
    assert out.chunks[1].start_pos == 2 and out.chunks[1].needs_logits
    assert sum(len(c.token_ids) for c in out.chunks) <= 10


def test_max_num_seqs_and_fifo_admission():
    s = make(max_num_seqs=2)
    seqs = [seq(i, 3, start=10 * i) for i in range(4)]
    for q in seqs:
        s.add(q)
    assert step(s).seqs == seqs[:2]
    s.finish(seqs[0], "stop")
    out = step(s)
    assert out.seqs == [seqs[1], seqs[2]]  # the oldest waiting one takes the free slot


def test_preemption_newest_first_requeued_at_front_and_no_leak():
    s = make(num_blocks=4, block_size=2, budget=64)
    a, b = seq(0, 3), seq(1, 3, start=50)
    s.add(a), s.add(b)
    step(s)  # prefill: a and b take 2 blocks each: pool full
    step(s)  # both compute their 4th token: still 2 blocks each
    out = step(s)  # a needs a 3rd block: b (newest) is preempted
    assert out.preempted == [b] and b.status is SequenceStatus.WAITING and s.waiting[0] is b
    assert out.seqs == [a] and b.num_computed_tokens == 0 and b.num_preemptions == 1
    s.finish(a, "stop")
    out = step(s)
    assert out.seqs == [b] and out.chunks[0].start_pos == 0 and len(out.chunks[0].token_ids) == 5  # recompute
    s.finish(b, "stop")
    assert s.block_manager.num_free_blocks == 4 and not s.has_unfinished


def test_a_sequence_preempts_itself_when_it_is_the_only_one():
    s = make(num_blocks=2, block_size=2)
    a = seq(0, 3)
    s.add(a)
    step(s)  # prefill
    step(s)  # 4th token: 2 blocks
    step(s)  # 5th token needs a 3rd block that does not exist
    assert a.status is SequenceStatus.WAITING and s.block_manager.num_free_blocks == 2


def test_prefix_sharing_through_the_scheduler():
    s = make(prefix=True, block_size=4)
    a, b = seq(0, 9), seq(1, 9)
    s.add(a)
    step(s)
    s.add(b)
    out = step(s)
    chunk_b = out.chunks[out.seqs.index(b)]
    assert chunk_b.start_pos == 8 and b.num_cached_tokens == 8
    assert b.block_table[:2] == a.block_table[:2]


def test_abort_frees_blocks_of_running_and_waiting():
    s = make(num_blocks=8, max_num_seqs=1)
    a, b = seq(0, 5), seq(1, 5, start=20)
    s.add(a), s.add(b)
    step(s)
    s.finish(a, "abort"), s.finish(b, "abort")
    assert s.block_manager.num_free_blocks == 8 and not s.has_unfinished
