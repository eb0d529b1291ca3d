"""Where an experiment's per-text work runs: in this process, or sharded over Ray workers.

Every text-reading experiment (``layers``, ``decompose``, ``perturb``) is split in two:

* ``shard_rows(model, encoded, options) -> ShardPart``: the per-token / per-perturbation
  rows of some texts. A text's rows depend on nothing but the text, its ``text_id`` and the
  seed, so any contiguous run of texts (a *shard*) can be computed anywhere.
* the summaries (bootstrap intervals, pooled means), computed from the merged rows with the
  run's seed, in the process that called the experiment.

``engine="local"`` (the default) computes one shard holding every text. ``engine="ray"``
cuts the texts into shards of whole batches (so that every batch, and therefore every
number, is the one the local run computes), runs them on Ray actors that each load the
model once (a GPU each where the cluster has GPUs), and streams each finished shard's
tables to Parquet in a spool directory. The merged tables are read back in shard order.
A worker that dies is restarted by Ray and its shard run again; a shard's files are written
once, under its index, so a retried shard can neither be lost nor counted twice.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import os
import pickle
import shutil
import signal
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import pandas as pd
from tqdm.auto import tqdm

from residual_trace.errors import UserError

if TYPE_CHECKING:
    from residual_trace.models import TracedModel
    from residual_trace.tracer.batching import EncodedText

__all__ = [
    "ENGINES",
    "ModelRequest",
    "ShardPart",
    "plan_shards",
    "run_shards",
]

#: The ``engine`` choices.
ENGINES = ("local", "ray")

#: Shards per worker (more shards: finer progress and load balance, more Parquet files).
SHARDS_PER_WORKER = 4

#: How often Ray restarts a dead worker and re-runs its shard before the run fails.
MAX_RETRIES = 3

#: Test hook: ``INDEX:MARKER`` makes the worker running shard INDEX kill itself (SIGKILL)
#: the first time, creating MARKER so that the retry survives.
KILL_SHARD_ENV = "RESIDUAL_TRACE_TEST_KILL_SHARD"


@dataclass
class ShardPart:
    """What one shard (or the merge of several) produced.

    Attributes:
        tables: row tables keyed like the experiment's tables (``drift``, ``heads`` ...);
            a key may be missing from a shard that has no rows for it.
        extra: the experiment's other per-shard facts (a small picklable value).
        engine: how the rows were computed, for ``run.json`` (engine, workers, shards).
    """

    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    extra: Any = None
    engine: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class _Experiment(Protocol):
    def shard_rows(
        self, model: TracedModel, encoded: Sequence[EncodedText], options: Any
    ) -> ShardPart: ...

    def merge_extras(self, extras: list[Any]) -> Any: ...


def _experiment(command: str) -> _Experiment:
    module: Any = importlib.import_module(f"residual_trace.experiments.{command}")
    return module


@dataclass(frozen=True)
class ModelRequest:
    """What a worker needs to load the driver's model, and the hash its weights must have."""

    name: str
    dtype: str
    weights_sha256: str

    @classmethod
    def of(cls, model: TracedModel) -> ModelRequest:
        return cls(
            name=model.resolved.name,
            dtype=str(model.dtype).removeprefix("torch."),
            weights_sha256=model.resolved.weights_sha256,
        )


def plan_shards(n_texts: int, batch_size: int, workers: int) -> list[range]:
    """Contiguous text ranges of whole batches, about ``SHARDS_PER_WORKER`` per worker.

    Shards start on batch boundaries of the local run, so every forward pass sees the same
    texts with the same padding as it would in one process.
    """
    n_batches = math.ceil(n_texts / batch_size)
    per_shard = max(1, math.ceil(n_batches / (workers * SHARDS_PER_WORKER)))
    size = per_shard * batch_size
    return [range(start, min(start + size, n_texts)) for start in range(0, n_texts, size)]


def merge_parts(command: str, parts: Sequence[ShardPart]) -> ShardPart:
    """Shards in order -> one part: tables concatenated, extras merged by the experiment."""
    keys: list[str] = []
    for part in parts:
        keys += [k for k in part.tables if k not in keys]
    tables = {
        key: pd.concat([p.tables[key] for p in parts if key in p.tables], ignore_index=True)
        for key in keys
    }
    return ShardPart(tables, _experiment(command).merge_extras([p.extra for p in parts]))


def run_shards(
    command: str,
    model: TracedModel,
    encoded: Sequence[EncodedText],
    options: Any,
) -> ShardPart:
    """Run ``command``'s per-text work on ``encoded`` with ``options.engine``."""
    experiment = _experiment(command)
    if options.engine == "local":
        part = experiment.shard_rows(model, encoded, options)
        part.engine = {"engine": "local"}
        return part
    return _RayRun(command, model, encoded, options).run()


# -- Ray -------------------------------------------------------------------------------------


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise UserError(
            "engine (--engine) ray: Ray is not installed; pip install 'residual-trace[ray]'"
        ) from None
    return ray


class ShardWorker:
    """A Ray actor: loads the model once, then computes the shards it is given."""

    def __init__(self, request: ModelRequest, threads: int | None, use_gpu: bool) -> None:
        import torch

        from residual_trace.models import load_model

        if threads:
            torch.set_num_threads(threads)
        # a failure to load is kept and raised by run(), where Ray reports it as it is
        self.failure: UserError | None = None
        try:
            self.model = load_model(
                request.name, device="cuda" if use_gpu else "cpu", dtype=request.dtype
            )
        except UserError as error:
            self.failure = error
            return
        found = self.model.resolved.weights_sha256
        if found != request.weights_sha256:
            self.failure = UserError(
                f"model '{request.name}' on a Ray worker has other weights than here "
                f"(sha256 {found[:12]} vs {request.weights_sha256[:12]}); install the same "
                "checkpoint on every node"
            )

    def run(
        self,
        command: str,
        index: int,
        encoded: Sequence[EncodedText],
        options: Any,
        kill_marker: str | None = None,
    ) -> ShardPart:
        if kill_marker is not None and not os.path.exists(kill_marker):
            Path(kill_marker).touch()
            os.kill(os.getpid(), signal.SIGKILL)  # a worker dying mid-shard (tests)
        if self.failure is not None:
            raise self.failure
        return _experiment(command).shard_rows(self.model, encoded, options)


def _kill_request() -> tuple[int, str] | None:
    value = os.environ.get(KILL_SHARD_ENV)
    if not value:
        return None
    index, _, marker = value.partition(":")
    return int(index), marker


class _Spool:
    """Finished shards as Parquet (tables) and pickle (extras), one set per shard index."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="residual-trace-shards-"))
        self.tables: dict[int, list[str]] = {}

    def write(self, index: int, part: ShardPart) -> None:
        names = []
        for key, frame in part.tables.items():
            target = self.root / f"shard-{index:05d}.{key}.parquet"
            partial = target.with_suffix(".partial")
            frame.to_parquet(partial, index=False)
            partial.replace(target)  # a shard's file appears whole, once
            names.append(key)
        with open(self.root / f"shard-{index:05d}.extra.pickle", "wb") as handle:
            pickle.dump(part.extra, handle)
        self.tables[index] = names

    def read(self, index: int) -> ShardPart:
        tables = {
            key: pd.read_parquet(self.root / f"shard-{index:05d}.{key}.parquet")
            for key in self.tables[index]
        }
        with open(self.root / f"shard-{index:05d}.extra.pickle", "rb") as handle:
            extra = pickle.load(handle)  # written by this process, just now
        return ShardPart(tables, extra)

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


class _RayRun:
    """One sharded run: connect, start the workers, feed them shards, spool, merge."""

    def __init__(
        self, command: str, model: TracedModel, encoded: Sequence[EncodedText], options: Any
    ) -> None:
        self.command = command
        self.model = model
        self.encoded = list(encoded)
        self.options = options
        # workers never draw bars; the driver's bar counts texts over all shards
        self.worker_options = dataclasses.replace(
            options, quiet=True, engine="local", ray_address=None, workers=None
        )

    def run(self) -> ShardPart:
        ray = _import_ray()
        started = self._connect(ray)
        spool = _Spool()
        try:
            return self._run(ray, spool)
        finally:
            spool.close()
            if started:
                ray.shutdown()

    def _connect(self, ray: Any) -> bool:
        """Join ``ray_address`` (or the running session, or start a local one)."""
        if ray.is_initialized():
            return False
        kwargs: dict[str, Any] = {"log_to_driver": False, "logging_level": "ERROR"}
        if self.options.ray_address:
            kwargs["address"] = self.options.ray_address
        else:
            kwargs["include_dashboard"] = False
        try:
            ray.init(**kwargs)
        except Exception as error:
            first = (str(error).strip().splitlines() or [type(error).__name__])[0]
            where = self.options.ray_address or "a local Ray instance"
            raise UserError(f"ray_address (--ray-address): cannot join {where}: {first}") from None
        return True

    def _workers(self, ray: Any, n_batches: int) -> tuple[int, int | None, bool]:
        """Number of workers, torch threads each (CPU only) and whether each gets a GPU."""
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        cpus = max(1, int(resources.get("CPU", 1)))
        available = gpus if gpus else cpus
        workers = self.options.workers or available
        if workers > available:
            kind = "GPUs" if gpus else "CPUs"
            raise UserError(
                f"workers (--workers) {workers}: the Ray cluster has {available} {kind}"
            )
        workers = min(workers, n_batches)
        # a worker's cores must fit on one node, or Ray could never place it
        largest = max(
            (int(node["Resources"].get("CPU", 0)) for node in ray.nodes() if node["Alive"]),
            default=cpus,
        )
        threads = None if gpus else max(1, min(cpus // workers, largest))
        return workers, threads, bool(gpus)

    def _run(self, ray: Any, spool: _Spool) -> ShardPart:
        options = self.options
        n_batches = math.ceil(len(self.encoded) / options.batch_size)
        workers, threads, use_gpu = self._workers(ray, n_batches)
        shards = plan_shards(len(self.encoded), options.batch_size, workers)
        cpus = threads if threads else 1
        actor_type = ray.remote(
            num_cpus=1 if use_gpu else cpus,
            num_gpus=1 if use_gpu else 0,
            max_restarts=MAX_RETRIES,
            max_task_retries=MAX_RETRIES,
        )(ShardWorker)
        request = ModelRequest.of(self.model)
        actors = [actor_type.remote(request, threads, use_gpu) for _ in range(workers)]
        kill = _kill_request()
        pending = list(enumerate(shards))
        running: dict[Any, tuple[int, Any]] = {}

        def submit(actor: Any) -> None:
            index, texts = pending.pop(0)
            marker = kill[1] if kill is not None and kill[0] == index else None
            ref = actor.run.remote(
                self.command,
                index,
                [self.encoded[i] for i in texts],
                self.worker_options,
                marker,
            )
            running[ref] = (index, actor)

        with tqdm(
            total=len(self.encoded),
            desc=f"{self.command} {self.model.name} on {workers} Ray worker(s)",
            unit="text",
            disable=not options.progress,
            leave=False,
        ) as bar:
            for actor in actors:
                if pending:
                    submit(actor)
            while running:
                done, _ = ray.wait(list(running), num_returns=1)
                ref = done[0]
                index, actor = running.pop(ref)
                spool.write(index, self._get(ray, ref, index))
                del ref, done
                bar.update(len(shards[index]))
                if pending:
                    submit(actor)
        for actor in actors:
            ray.kill(actor)
        merged = merge_parts(self.command, [spool.read(i) for i in range(len(shards))])
        merged.engine = {
            "engine": "ray",
            "ray_address": options.ray_address,
            "workers": workers,
            "gpu_per_worker": use_gpu,
            "threads_per_worker": threads,
            "shards": len(shards),
            "texts_per_shard": len(shards[0]),
        }
        return merged

    @staticmethod
    def _get(ray: Any, ref: Any, index: int) -> ShardPart:
        try:
            part: ShardPart = ray.get(ref)
        except ray.exceptions.RayTaskError as error:  # also an instance of the task's error
            cause = getattr(error, "cause", None)
            if isinstance(cause, UserError):
                raise UserError(f"on a Ray worker: {cause}") from None
            raise
        except ray.exceptions.RayActorError as error:
            first = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise UserError(
                f"engine ray: shard {index} failed after {MAX_RETRIES} retries: {first}"
            ) from None
        return part
