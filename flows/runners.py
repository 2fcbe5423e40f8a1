"""The Prefect task runner of the shard maps, chosen by the `runner` section of params.yaml.

    runner: {type: thread, workers: 2}                    ThreadPoolTaskRunner(max_workers=2)  (default)
    runner: {type: dask, workers: 2}                      DaskTaskRunner on a temporary LocalCluster of
                                                          2 worker processes with 1 thread each
    runner: {type: dask, address: tcp://host:8786}        DaskTaskRunner on an existing Dask scheduler
    runner: {type: ray, workers: 2}                       RayTaskRunner on a temporary local Ray with 2 CPUs
    runner: {type: ray, address: ray://host:10001}        RayTaskRunner on an existing Ray cluster

The same flows run on all of them unchanged (DESIGN.md 4): a flow with a shard map is started
as `run_with_runner(flow, params.runner, ...)`. prefect-dask is a dependency; prefect-ray pulls
Ray (~250 MB), so it is the optional extra `[ray]` and imported only when asked for.

Workers that are separate processes report their task runs to the Prefect API themselves. In
Prefect's local mode (no server, no PREFECT_API_URL) each of them would start its own temporary
server on the same database, so `run_with_runner` points them at this process's server.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from prefect import Flow
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from realm_core.config import RunnerParams

RAY_INSTALL = "pip install -e '.[ray]'  (or: pip install 'prefect-ray>=0.6,<0.7')"
LOOPBACK = "127.0.0.1"


def make_task_runner(runner: RunnerParams) -> TaskRunner:
    """A fresh, not yet started Prefect task runner for `runner` (params.yaml `runner:`)."""
    if runner.type == "thread":
        return ThreadPoolTaskRunner(max_workers=runner.workers)
    if runner.type == "dask":
        from prefect_dask import DaskTaskRunner

        if runner.address:
            return DaskTaskRunner(address=runner.address)
        # Processes, 1 thread each: the GIL never serialises the shards, and each worker's torch
        # uses one thread (Dask's nanny sets OMP_NUM_THREADS=1), so N workers fill N cores.
        # Loopback only: the scheduler, workers and dashboard (Dask's default ":8787" is every
        # interface) listen on 127.0.0.1 (issue #16, 7); a busy 8787 falls back to a free port.
        cluster = {
            "n_workers": runner.workers,
            "threads_per_worker": 1,
            "processes": True,
            "host": LOOPBACK,
            "dashboard_address": f"{LOOPBACK}:8787",
        }
        return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs=cluster)
    if runner.type == "ray":
        try:
            from prefect_ray import RayTaskRunner
        except ImportError:
            raise ImportError(
                f"params.yaml runner.type: ray needs prefect-ray, which is not installed; run: {RAY_INSTALL}"
            ) from None
        if runner.address:
            return RayTaskRunner(address=runner.address)
        return RayTaskRunner(init_kwargs={"num_cpus": runner.workers, "include_dashboard": False})
    raise ValueError(f"unknown runner.type {runner.type!r}; use thread, dask or ray")


@contextmanager
def shared_api(runner: RunnerParams) -> Iterator[None]:
    """Inside it, worker processes use this process's Prefect API server (see the module docstring)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if runner.type == "thread" or PREFECT_API_URL.value():
        yield
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the local-mode server of this process (started on first use)
    if not server.running:
        server.start()
    with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        yield


def run_with_runner(flow: Flow, runner: RunnerParams, *args: Any, **kwargs: Any) -> Any:
    """Call `flow` (as a subflow when inside a flow) with the task runner `runner` asks for."""
    with shared_api(runner):
        return flow.with_options(task_runner=make_task_runner(runner))(*args, **kwargs)
