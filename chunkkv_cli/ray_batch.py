"""`chunkkv batch --ray [ADDRESS]`: the batch's documents spread over a Ray cluster with Ray Data (the `ray` extra).

The driver reads the jobs and the records of earlier runs as the local path does (`batch.check_resume`), groups
the unfinished jobs by document (`jobs.document_groups`) and makes a Ray Dataset of them, one row and one block
per document, so the blocks spread over the actors. An actor pool answers it: one model per actor (one GPU per
actor when the cluster has GPUs, else CPU actors), each document compressed once and its questions answered by
the local path's own runner and record builder (`batch_runner.ModelRunner`, `batch.run_job`), so the records have
the local path's schema. The driver appends each record to the part file as it arrives (one fsynced line) and
merges at the end (`answers.merge`): a rerun skips what is already there. Ray restarts an actor that dies and
retries its document; that document's records only reach the part file once it is whole, so none is written twice.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from chunkkv_cli.answers import PartWriter, existing_records, finished, merge, part_path
from chunkkv_cli.batch import RunnerError, Settings, Tally, check_resume, run_job, summarize
from chunkkv_cli.errors import ChunkKVError
from chunkkv_cli.jobs import Job, document_groups, document_key

# `--ray` without an address: a Ray instance started for this run on this machine.
LOCAL = "local"
EXTRA_HINT = "pip install 'chunkkv[ray]'"
CONNECT_TIMEOUT_S = 5.0
# Times Ray restarts a dead actor and retries its document before the run stops (a crash on every try would
# otherwise loop forever).
RETRIES = 3

RunnerFactory = Callable[[list[Job]], Callable]


def require_ray():
    """The ray module, or a one-line error naming the extra that installs it."""
    try:
        import ray
        import ray.data  # noqa: F401  (Ray Data comes with the extra, not with a bare `pip install ray`)
    except ImportError as err:
        raise ChunkKVError(f"--ray needs the optional ray extra ({err.name or 'ray'} is not installed): {EXTRA_HINT}") from None
    return ray


def host_and_port(address: str) -> tuple[str, int] | None:
    """(host, port) of a HOST:PORT or ray://HOST:PORT address; None for `auto` (Ray finds a local cluster)."""
    if address == "auto":
        return None
    rest = address.split("://", 1)[-1]
    host, _, port = rest.rpartition(":")
    if not host or not port.isdigit():
        raise ChunkKVError(f"--ray {address}: give HOST:PORT (the address `ray start --head` prints), ray://HOST:PORT, "
                           "auto, or nothing for a local instance")  # fmt: skip
    return host.strip("[]"), int(port)


def check_reachable(address: str) -> None:
    """A quick TCP connect first: Ray itself waits a long time before giving up on a wrong address."""
    where = host_and_port(address)
    if where is None:
        return
    try:
        socket.create_connection(where, timeout=CONNECT_TIMEOUT_S).close()
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise ChunkKVError(f"cannot reach the Ray cluster at {address} ({reason}); start one with `ray start --head` "
                           "and pass the address it prints, or give --ray alone for a local instance") from None


def connect(address: str, num_cpus: int | None = None, runtime_env: dict | None = None) -> bool:
    """Join (or start) the Ray cluster; True when this call started the connection (the caller shuts it down)."""
    ray = require_ray()
    if address != LOCAL:
        check_reachable(address)
    if ray.is_initialized():  # a session that already joined a cluster (a notebook, a test) keeps it
        return False
    quiet_ray()
    try:
        ray.init(address=None if address == LOCAL else address, num_cpus=num_cpus, runtime_env=runtime_env,
                 include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)  # fmt: skip
    except (ConnectionError, RuntimeError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ChunkKVError(f"cannot join the Ray cluster at {address}: {first}") from None
    return True


def quiet_ray() -> None:
    """Ray's own progress bars and notices off: the batch shows its progress and errors as the local path does."""
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = context.print_on_execution_start = False
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.ERROR)


def job_row(group: list[Job]) -> dict:
    """One document's jobs as a Dataset row (JSON: a job's `meta` can hold anything)."""
    jobs = [{**asdict(job), "path": str(job.path)} for job in group]
    return {"document": document_key(group[0]), "jobs": json.dumps(jobs, ensure_ascii=False)}


def jobs_of(row_jobs: str) -> list[Job]:
    return [Job(**{**fields, "path": Path(fields["path"])}) for fields in json.loads(row_jobs)]


class Answerer:
    """A Ray Data actor: one model (loaded at its first document by `runners`), one document per row.

    Returns the document's records as JSON lines, or `fatal`: the runner itself failed (the model does not load),
    which stops the batch as it does on the local path. `answerer_class` sets `runners` and `settings`.
    """

    runners: RunnerFactory
    settings: Settings

    def __call__(self, batch: dict) -> dict:
        records = []
        for row_jobs in batch["jobs"]:
            jobs = jobs_of(str(row_jobs))
            runner = self.runners(jobs)
            try:
                records += [json.dumps(run_job(job, runner, self.settings.for_job(job), 0)) for job in jobs]
            except RunnerError as err:
                return {"record": [""], "fatal": [str(err)]}
        return {"record": records, "fatal": [""] * len(records)}


def answerer_class(runners: RunnerFactory, settings: Settings) -> type:
    """An `Answerer` carrying its runner factory and settings in the class: an actor that Ray restarts is rebuilt
    from the class alone (constructor arguments would live in the object store, and could be gone by then)."""
    return type("Answerer", (Answerer,), {"runners": runners, "settings": settings})


class ModelRunners:
    """The default runner factory: a `ModelRunner` per document, sharing one model per actor."""

    def __init__(self, spec, settings: Settings):
        self.spec, self.settings, self.loaded = spec, settings, None

    def __call__(self, jobs: list[Job]):
        from chunkkv_cli.batch_runner import ModelRunner

        return ModelRunner(self._load, jobs, self.settings)

    def _load(self):
        if self.loaded is None:
            self.loaded = self.spec.load()
        return self.loaded


def actor_resources(n_documents: int, actors: int | None) -> tuple[int, dict]:
    """(pool size, each actor's resources): one GPU per actor where the cluster has GPUs, else one CPU.

    A GPU actor also takes half its GPU's share of the CPUs: Ray gives an actor as many torch threads as CPUs,
    and with one thread each document took a fifth longer on an H200 than in a local process with sixteen.
    """
    import ray

    gpus = int(ray.cluster_resources().get("GPU", 0))
    cpus = int(ray.cluster_resources().get("CPU", 1))
    if gpus:
        return max(1, min(n_documents, actors or gpus)), {"num_gpus": 1, "num_cpus": max(1, cpus // (2 * gpus))}
    return max(1, min(n_documents, actors or cpus)), {"num_cpus": 1}


def answer_on_ray(groups: list[list[Job]], runners: RunnerFactory, settings: Settings, actors: int | None = None):
    """Rows of records as the actors finish documents (a streaming Ray Data pipeline), and the pool size."""
    import ray
    from ray.data import ActorPoolStrategy

    size, resources = actor_resources(len(groups), actors)
    dataset = ray.data.from_items([job_row(group) for group in groups], override_num_blocks=len(groups))
    answered = dataset.map_batches(answerer_class(runners, settings), batch_size=1, compute=ActorPoolStrategy(size=size),
                                   max_restarts=RETRIES, max_task_retries=RETRIES, **resources)  # fmt: skip
    return answered.iter_rows(), size


def run_ray_batch(
    jobs: list[Job], output: Path, runners: RunnerFactory, settings: Settings, address: str = LOCAL,
    on_start: Callable[[int], None] | None = None, on_done: Callable[[dict], None] | None = None,
    actors: int | None = None, ray_init: dict | None = None,
) -> dict:  # fmt: skip
    """Answer the unfinished jobs on Ray, appending records as they arrive; merge; return the run's summary.

    `ray_init`: extra `connect` arguments (num_cpus, runtime_env) for a local instance.
    """
    start = time.perf_counter()
    records = existing_records(output)
    check_resume(records, jobs, settings, output)
    done = finished(records)
    todo = [job for job in jobs if job.id not in done]
    if on_start is not None:
        on_start(len(todo))
    tally, size = Tally(), 0
    if todo:
        owned = connect(address, **(ray_init or {}))
        try:
            size = _collect(todo, output, runners, settings, actors, tally, on_done)
        finally:
            if owned:
                require_ray().shutdown()
    tally.seconds = time.perf_counter() - start
    counts = merge(output, [job.id for job in jobs])
    return {**summarize([tally], counts, len(jobs), len(done), output), "ray_actors": size}


def _collect(todo, output, runners, settings, actors, tally: Tally, on_done) -> int:
    """Append each record to the part file as its document finishes; a fatal runner error stops the run."""
    rows, size = answer_on_ray(document_groups(todo), runners, settings, actors)
    with PartWriter(part_path(output, 0, 1)) as writer:
        try:
            for row in rows:
                if row["fatal"]:
                    raise RunnerError(row["fatal"])
                record = json.loads(row["record"])
                writer.write(record)
                tally.add(record)
                if on_done is not None:
                    on_done(record)
        except ChunkKVError:
            raise
        except Exception as err:  # Ray's own failures: an actor that kept dying, a lost node, ...
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ChunkKVError(f"the Ray run stopped ({type(err).__name__}: {first}); the {tally.answered + tally.failed} "
                               f"records written are kept, and a rerun resumes after them", 1) from err  # fmt: skip
    return size
