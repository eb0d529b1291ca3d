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

A Ray run fails fast and leaves nothing behind (:mod:`.ray_guard`): a ``--ray-address`` is
probed before Ray is asked to join it; a local Ray started by the command is shut down on
every way out and tied to the driver's process (a reaper ends it when the driver is
SIGKILLed); the spool lives in a hidden temporary sibling of ``--out``
(``.<out>.tmp-<pid>-spool-*``, which the next run into that ``--out`` removes when its
process is gone); Ray's own log stays off the terminal unless ``RESIDUAL_TRACE_DEBUG=1``;
and a Ctrl-C (also one sent to the whole process group) is a ``KeyboardInterrupt``, whatever
Ray raised after it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import pickle
import shutil
import signal
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

import pandas as pd

from residual_trace import settings
from residual_trace.errors import UserError
from residual_trace.experiments import ray_guard
from residual_trace.experiments.contract import ShardPart
from residual_trace.experiments.options import Engine
from residual_trace.progress import progress_bar

if TYPE_CHECKING:
    from residual_trace.experiments.contract import Experiment
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
ENGINES: tuple[str, ...] = get_args(Engine)

#: Shards per worker (more shards: finer progress and load balance, more Parquet files).
SHARDS_PER_WORKER = 4

#: How often Ray restarts a dead worker and re-runs its shard before the run fails.
MAX_RETRIES = 3

#: Test hook: ``INDEX:MARKER`` makes the worker running shard INDEX kill itself (SIGKILL)
#: the first time, creating MARKER so that the retry survives.
KILL_SHARD_ENV = "RESIDUAL_TRACE_TEST_KILL_SHARD"

#: Test hook: ``INDEX:MARKER`` makes the worker running shard INDEX create MARKER and then
#: sleep for :data:`STALL_S` seconds, so that a test can stop the driver mid-run.
STALL_SHARD_ENV = "RESIDUAL_TRACE_TEST_STALL_SHARD"
STALL_S = 600.0


@dataclass(frozen=True)
class ModelRequest:
    """What a worker needs to load the driver's model, and the hash its weights must have."""

    name: str
    dtype: str
    weights_sha256: str

    @classmethod
    def of(cls, model: TracedModel) -> ModelRequest:
        """What a worker needs to load ``model`` and check that it has the same weights."""
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


def merge_parts(experiment: Experiment, parts: Sequence[ShardPart]) -> ShardPart:
    """Shards in order -> one part: tables concatenated, extras merged by the experiment."""
    keys: list[str] = []
    for part in parts:
        keys += [k for k in part.tables if k not in keys]
    tables = {
        key: pd.concat([p.tables[key] for p in parts if key in p.tables], ignore_index=True)
        for key in keys
    }
    return ShardPart(tables, experiment.merge_extras([p.extra for p in parts]))


def run_shards(
    experiment: Experiment,
    model: TracedModel,
    encoded: Sequence[EncodedText] | Sequence[Any],
    options: Any,
) -> ShardPart:
    """Run ``experiment``'s per-item work on ``encoded`` with ``options.engine``.

    The items are encoded texts, or a verb's own units (``patch``'s pairs): the engine only
    slices them into shards of whole batches (``options.batch_size`` items) and pickles them.
    """
    if options.engine == "local":
        part = experiment.rows(model, encoded, options)
        part.engine = {"engine": "local"}
        return part
    return _RayRun(experiment, model, encoded, options).run()


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
        experiment: Experiment,
        index: int,
        encoded: Sequence[EncodedText],
        options: Any,
        kill_marker: str | None = None,
        stall_marker: str | None = None,
    ) -> ShardPart:
        if kill_marker is not None and not os.path.exists(kill_marker):
            Path(kill_marker).touch()
            os.kill(os.getpid(), signal.SIGKILL)  # a worker dying mid-shard (tests)
        if stall_marker is not None:
            Path(stall_marker).touch()
            time.sleep(STALL_S)  # a shard that takes long (tests stop the driver meanwhile)
        if self.failure is not None:
            raise self.failure
        return experiment.rows(self.model, encoded, options)


def _test_request(name: str = KILL_SHARD_ENV) -> tuple[int, str] | None:
    value = os.environ.get(name)
    if not value:
        return None
    index, _, marker = value.partition(":")
    return int(index), marker


def _spool_parent() -> tuple[Path, str]:
    """Where the spool goes, and its name's prefix.

    Beside the ``--out`` this process has claimed (``.<out>.tmp-<pid>-spool-``, a temporary sibling
    that the next run into that ``--out`` removes once this process is gone), else (no output
    claimed yet: the API) in the system's temporary directory (``rt-ray-<pid>-spool-``, removed by
    the next Ray run once this process is gone).
    """
    from residual_trace.runs import Claim

    held = list(Claim._held)  # the claims this process holds, the latest last
    if held:
        out = Path(held[-1])
        if out.parent.is_dir() and os.access(out.parent, os.W_OK | os.X_OK):
            return out.parent, f".{out.name}.tmp-{os.getpid()}-spool-"
    return ray_guard.temp_root(), f"{ray_guard.TEMP_PREFIX}{os.getpid()}-spool-"


class _Spool:
    """Finished shards as Parquet (tables) and pickle (extras), one set per shard index."""

    def __init__(self) -> None:
        parent, prefix = _spool_parent()
        self.root = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
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
        self,
        experiment: Experiment,
        model: TracedModel,
        encoded: Sequence[EncodedText] | Sequence[Any],
        options: Any,
    ) -> None:
        self.experiment = experiment
        self.model = model
        self.encoded = list(encoded)
        self.options = options
        # workers never draw bars; the driver's bar counts texts over all shards
        self.worker_options = options.replaced(
            quiet=True, engine="local", ray_address=None, workers=None
        )

        #: set when a SIGINT arrived during the run: whatever Ray raises after it is a
        #: consequence (a worker that died of the same Ctrl-C), so it becomes an interrupt
        self.interrupted = False

    def run(self) -> ShardPart:
        ray = _import_ray()
        spool = _Spool()
        started, local = False, None
        try:
            started, local = self._connect(ray, spool)
            with self._noting_sigint():
                return self._run(ray, spool)
        except Exception:
            if self.interrupted:
                raise KeyboardInterrupt from None
            raise
        finally:
            with _deferring_sigint():  # a second Ctrl-C must not cut the clean-up short
                spool.close()
                if started:
                    with contextlib.suppress(Exception):
                        ray.shutdown()
                if local is not None:
                    local.close()

    @contextlib.contextmanager
    def _noting_sigint(self) -> Iterator[None]:
        """Note a SIGINT (then handle it as before: a ``KeyboardInterrupt``)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.getsignal(signal.SIGINT)
        if not callable(previous):
            yield
            return

        def note(signum: int, frame: Any) -> None:
            self.interrupted = True
            previous(signum, frame)

        signal.signal(signal.SIGINT, note)
        try:
            yield
        finally:
            if signal.getsignal(signal.SIGINT) is note:
                signal.signal(signal.SIGINT, previous)

    def _connect(self, ray: Any, spool: _Spool) -> tuple[bool, ray_guard.LocalRay | None]:
        """Join ``ray_address`` (or the running session, or start a local one).

        The result says whether this call initialised Ray and, for a local Ray, its tie to this
        process.
        """
        if ray.is_initialized():
            return False, None
        debug = settings.debug()
        kwargs: dict[str, Any] = {
            "log_to_driver": debug,
            "logging_level": logging.INFO if debug else logging.ERROR,
        }
        address, setting = self.options.ray_address, "ray_address (--ray-address)"
        if address is None and os.environ.get("RAY_ADDRESS", "").strip():
            address, setting = os.environ["RAY_ADDRESS"], "RAY_ADDRESS"
        local = None
        if address is not None:
            kwargs["address"] = _check_address(ray, address.strip(), setting)
            where = repr(address.strip())
        else:
            ray_guard.sweep()
            # Ray's log directory is removed with the run unless asked for (debug: kept)
            local = ray_guard.LocalRay(remove=(spool.root,), keep_temp=debug)
            kwargs.update(address="local", include_dashboard=False)
            if local.temp_dir is not None:
                kwargs["_temp_dir"] = str(local.temp_dir)
            where = "a local Ray instance"
        try:
            with _quiet(debug), local.starting() if local else contextlib.nullcontext():
                ray.init(**kwargs)
        except BaseException as error:
            with _deferring_sigint():
                with contextlib.suppress(Exception):
                    ray.shutdown()
                if local is not None:
                    local.close()
            if not isinstance(error, Exception):
                raise
            first = (str(error).strip().splitlines() or [type(error).__name__])[0]
            verb = "start" if local is not None else "join"
            raise UserError(f"{setting} {where}: cannot {verb} it: {first}") from None
        return True, local

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

    def _actors(self, ray: Any, workers: int, threads: int | None, use_gpu: bool) -> list[Any]:
        """``workers`` Ray actors, each loading the driver's model once.

        Ray restarts an actor up to ``MAX_RETRIES`` times if it dies.
        """
        actor_type = ray.remote(
            num_cpus=1 if use_gpu else (threads if threads else 1),
            num_gpus=1 if use_gpu else 0,
            max_restarts=MAX_RETRIES,
            max_task_retries=MAX_RETRIES,
        )(ShardWorker)
        request = ModelRequest.of(self.model)
        return [actor_type.remote(request, threads, use_gpu) for _ in range(workers)]

    def _run(self, ray: Any, spool: _Spool) -> ShardPart:
        options = self.options
        n_batches = math.ceil(len(self.encoded) / options.batch_size)
        workers, threads, use_gpu = self._workers(ray, n_batches)
        shards = plan_shards(len(self.encoded), options.batch_size, workers)
        actors = self._actors(ray, workers, threads, use_gpu)
        kill = _test_request(KILL_SHARD_ENV)
        stall = _test_request(STALL_SHARD_ENV)
        pending = list(enumerate(shards))
        running: dict[Any, tuple[int, Any]] = {}

        def submit(actor: Any) -> None:
            index, texts = pending.pop(0)
            marker = kill[1] if kill is not None and kill[0] == index else None
            stall_marker = stall[1] if stall is not None and stall[0] == index else None
            ref = actor.run.remote(
                self.experiment,
                index,
                [self.encoded[i] for i in texts],
                self.worker_options,
                marker,
                stall_marker,
            )
            running[ref] = (index, actor)

        with progress_bar(
            total=len(self.encoded),
            desc=f"{self.experiment.name} {self.model.name} on {workers} Ray worker(s)",
            unit="text",
            enabled=options.progress,
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
        merged = merge_parts(self.experiment, [spool.read(i) for i in range(len(shards))])
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


def _check_address(ray: Any, address: str, setting: str) -> str:
    """``address`` once it is known to lead to a Ray cluster.

    Otherwise a one-line error, within about ``2 * ray_guard.PROBE_TIMEOUT_S`` seconds, saying why
    it does not.
    """
    shown = repr(address)
    target = address
    if address == "auto":
        finder = getattr(
            getattr(getattr(ray, "_private", None), "services", None),
            "canonicalize_bootstrap_address_or_die",
            None,
        )
        if finder is not None:
            try:
                target = finder("auto")
            except Exception as error:
                first = (str(error).strip().splitlines() or [type(error).__name__])[0]
                raise UserError(
                    f"{setting} {shown}: found no Ray cluster to join: {first}"
                ) from None
    try:
        ray_guard.check(target)
    except ray_guard.AddressError as error:
        raise UserError(f"{setting} {shown}: cannot join a Ray cluster there: {error}") from None
    return address


@contextlib.contextmanager
def _quiet(debug: bool) -> Iterator[None]:
    """Ray's warnings and its C++ log lines off the terminal unless ``debug``.

    The C++ log lines are those Ray writes to file descriptor 2 while it starts or retries an
    address; what it wrote is dropped.
    """
    if debug:
        yield
        return
    with warnings.catch_warnings(), tempfile.TemporaryFile() as sink:
        warnings.simplefilter("ignore")
        try:
            saved = os.dup(2)
        except OSError:
            yield
            return
        sys.stderr.flush()
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


@contextlib.contextmanager
def _deferring_sigint() -> Iterator[None]:
    """Clean-up that a Ctrl-C must not interrupt.

    A SIGINT meanwhile is noted and raised as ``KeyboardInterrupt`` after it (unless an exception is
    on its way out already).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    caught: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught and callable(previous):
        raise KeyboardInterrupt
