"""Expert parallelism across processes: joining the torchrun group, rank 0 leading the steps, the others
following them, and a dead rank turned into one clear error instead of a hang.

Rank 0 runs the scheduler, the sampler and (for `serve`) the HTTP server. Before each forward pass it
broadcasts the step's scheduled chunks; every other rank runs the same pass on its own replica of the dense
weights and KV cache, with its share of the experts (marserve/experts/parallel.py). Three process groups:
the default one carries the step broadcasts and has no practical timeout (a follower may wait for hours
for the next request); the expert group carries the MoE collectives with the user's timeout; a heartbeat
group is exercised every second by a thread on every rank, so a rank that dies while the server is idle is
noticed within the timeout too. Launched by torchrun (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, ...),
so multi-node is torchrun's --nnodes/--node-rank/--master-addr. gloo on CPU; NCCL is chosen on CUDA
(untested here).
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
from datetime import timedelta

import torch
import torch.distributed as dist

from marserve.errors import ConfigError, MarserveError

logger = logging.getLogger(__name__)
_STOP = "stop"
HEARTBEAT_SECONDS = 1.0


class RankFailure(MarserveError):
    """A rank of the expert-parallel group died or stopped answering: the engine cannot continue."""


def describe_failure(e: BaseException) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return f"expert parallelism: a rank stopped answering ({first[:200]}); the engine cannot continue"


class ExpertParallel:
    """This process's place in the group: rank, world size, the groups, the placement (from setup())."""

    def __init__(self, size: int, timeout_s: float, placement_kind: str, model_dir, model_config):
        env_world = int(os.environ.get("WORLD_SIZE", "1"))
        if env_world != size:
            raise ConfigError(f"--expert-parallel-size {size} but WORLD_SIZE={env_world}: launch with "
                              f"torchrun --nproc-per-node {size} (times nodes) marserve ...")
        self.timeout = timedelta(seconds=timeout_s)
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend, timeout=timedelta(days=7))  # step broadcasts: followers wait idle
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.expert_group = dist.new_group(backend=backend, timeout=self.timeout)
        self.heartbeat_group = dist.new_group(backend="gloo", timeout=self.timeout)
        self.failure: str | None = None
        local = int(os.environ.get("LOCAL_WORLD_SIZE", size))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))  # ranks on one host share its cores
        self.placement = self._placement(placement_kind, model_dir, model_config)
        self._stop_heartbeat = threading.Event()
        self._heartbeat_thread = threading.Thread(target=self._heartbeat, name="marserve-ep-heartbeat", daemon=True)
        self._heartbeat_thread.start()

    def _placement(self, kind: str, model_dir, model_config):
        from marserve.experts import placement as pl
        from marserve.experts.placement_eval import checkpoint_mar_stats
        L = sum(model_config.is_moe_layer(i) for i in range(model_config.num_hidden_layers))
        chosen = None
        try:
            if self.rank == 0 and kind not in ("mar", "round_robin"):
                chosen = placement_from_file(kind, self.world_size, L, model_config.num_experts)
            elif self.rank == 0:
                stats = checkpoint_mar_stats(model_dir, model_config) if kind == "mar" else None
                chosen = (pl.mar(stats, self.world_size) if stats is not None else
                          pl.round_robin(L, model_config.num_experts, self.world_size)).to_dict()
                if kind == "mar" and stats is None:
                    logger.warning("placement mar needs MAR memory on every MoE layer; using round_robin")
        except (ConfigError, OSError, ValueError, KeyError) as e:
            chosen = {"error": f"expert placement: {e}"}  # every rank stops with rank 0's one line
        box = [chosen]
        dist.broadcast_object_list(box, src=0)  # one placement, whatever each rank would compute
        if "error" in box[0]:
            raise ConfigError(box[0]["error"])
        return pl.Placement.from_dict(box[0])

    def expert_group_for(self, transport: str = "all_to_all"):
        from marserve.experts.parallel import ExpertParallelGroup
        return ExpertParallelGroup(self.rank, self.world_size, self.placement, group=self.expert_group,
                                   transport=transport, timeout=self.timeout)

    def _heartbeat(self) -> None:
        # Each beat all-reduces "someone is stopping": every rank leaves after the same beat, so none is left
        # waiting in a collective the others have abandoned (which would end the process in std::terminate).
        beat = torch.zeros(1)
        while True:
            self._stop_heartbeat.wait(HEARTBEAT_SECONDS)
            beat.fill_(1.0 if self._stop_heartbeat.is_set() else 0.0)
            try:
                dist.all_reduce(beat, group=self.heartbeat_group)
            except Exception as e:  # noqa: BLE001 - any failure of a peer ends the group
                self.failure = self.failure or describe_failure(e)
                if self.rank != 0:  # a follower may be blocked in the step broadcast: leave now
                    _exit_with(self.rank, self.failure)
                logger.error("%s", self.failure)
                return
            if beat.item() > 0:
                return

    def close(self) -> None:
        """Leave the group cleanly (after rank 0's stop): heartbeats end together, then the groups go."""
        self._stop_heartbeat.set()
        self._heartbeat_thread.join(self.timeout.total_seconds() + 2 * HEARTBEAT_SECONDS)
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - already torn down
            pass


def _exit_with(rank: int, message: str) -> None:
    """A follower that lost the group: one line, then out (skipping teardown that would wait on dead peers)."""
    print(f"marserve: error: rank {rank}: {message}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(1)


def placement_from_file(path, num_ranks: int, num_layers: int, num_experts: int) -> dict:
    """The best-measured placement for num_ranks in a `marserve inspect --placement-json` report."""
    import json
    with open(path) as f:
        report = json.load(f)
    if not isinstance(report, dict) or not report.get("rows"):
        raise ConfigError(f"{path}: not a report of marserve inspect --placement N --placement-json FILE")
    if report.get("num_ranks") != num_ranks:
        raise ConfigError(f"{path}: placements for {report.get('num_ranks')} ranks, not {num_ranks}; write one "
                          f"with marserve inspect --placement {num_ranks} --placement-json {path}")
    best = max(report["rows"], key=lambda r: r["local_share"])
    if len(best["ranks"]) != num_layers or len(best["ranks"][0]) != num_experts:
        raise ConfigError(f"{path}: placement for {len(best['ranks'])} MoE layers x {len(best['ranks'][0])} "
                          f"experts; this model has {num_layers} x {num_experts}")
    return {"name": best["placement"], "num_ranks": num_ranks, "ranks": best["ranks"]}


class LeaderRunner:
    """Rank 0's ModelRunner: broadcasts each step's chunks, then runs the pass like every rank."""

    def __init__(self, runner, ep: ExpertParallel):
        self.runner, self.ep = runner, ep
        self._stopped = False
        atexit.register(self.stop)

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def check_health(self) -> None:
        """Raise RankFailure when the heartbeat has seen a rank go."""
        if self.ep.failure is not None:
            raise RankFailure(self.ep.failure)

    def execute(self, chunks):
        self.check_health()
        try:
            dist.broadcast_object_list([chunks], src=0)
            return self.runner.execute(chunks)
        except RankFailure:
            raise
        except (RuntimeError, dist.DistBackendError) as e:
            if not _is_comm_error(e):
                raise
            self.ep.failure = self.ep.failure or describe_failure(e)
            raise RankFailure(self.ep.failure) from None

    def stop(self) -> None:
        """Tell the followers to exit (at shutdown; also registered with atexit)."""
        if self._stopped or self.ep.failure is not None:
            return
        self._stopped = True
        try:
            dist.broadcast_object_list([_STOP], src=0)
        except Exception:  # noqa: BLE001 - a follower already gone needs no goodbye
            return
        self.ep.close()


def _is_comm_error(e: BaseException) -> bool:
    text = str(e).lower()
    return isinstance(e, dist.DistBackendError) or any(
        w in text for w in ("gloo", "nccl", "connection", "timed out", "timeout", "peer", "socket"))


def follow(runner, ep: ExpertParallel) -> int:
    """A follower's life: run every step rank 0 broadcasts until it says stop -> exit code."""
    while True:
        box = [None]
        try:
            dist.broadcast_object_list(box, src=0)
            if box[0] == _STOP:
                ep.close()
                return 0
            runner.execute(box[0])
        except Exception as e:  # noqa: BLE001 - rank 0 or a peer is gone: say so in one line
            if not _is_comm_error(e):
                raise
            _exit_with(ep.rank, describe_failure(e))


def setup(config):
    """(ExpertParallel, prepare(model) for load_model) when config asks for expert parallelism, else (None, None)."""
    if config.expert_parallel_size <= 1:
        return None, None
    from marserve.config import ModelConfig
    from marserve.experts.parallel import shard_experts
    model_config = ModelConfig.from_dir(config.model)
    if config.expert_parallel_size > model_config.num_experts:
        raise ConfigError(f"--expert-parallel-size {config.expert_parallel_size} exceeds the model's "
                          f"{model_config.num_experts} experts per layer")
    ep = ExpertParallel(config.expert_parallel_size, config.expert_parallel_timeout, config.expert_placement,
                        config.model, model_config)
    group = ep.expert_group_for(config.expert_transport)
    ep.experts = group  # the bench reads its byte counters
    return ep, lambda model: shard_experts(model, group)


def lead_or_follow(runner, ep: ExpertParallel):
    """Rank 0: the runner that leads the group. Others: follow rank 0's steps, then exit the process."""
    if ep.rank == 0:
        return LeaderRunner(runner, ep)
    raise SystemExit(follow(runner, ep))
