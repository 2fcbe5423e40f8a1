"""Index refresh during REALM pre-training (Guu et al. 2020, section 3.3), synchronous or asynchronous.

REALM retrieves from a *stale* index: block embeddings computed with an older snapshot of
Embed_doc. Section 3.3: the index is refreshed "asynchronously ... every several hundred training
steps" by two jobs running in parallel, a trainer and an index builder: the builder takes a
snapshot of the parameters, re-embeds every block and builds a new index while the trainer keeps
stepping on the old one, and the trainer swaps the new index in when it is ready. Section 4.5 /
Table 2 shows why freshness matters (a 30x staler index costs 9.5 EM on NQ).

Two refreshers with one interface (`initial`, `step`, `close`, `records`):

- `SyncRefresher` builds in the trainer's process when a refresh is due: deterministic, for tests
  and debugging. The trainer waits for the whole build.
- `AsyncRefresher` runs the builder in a separate process and hands everything over through files
  in `work_dir`, each written under a temporary name and renamed into place:

      embedder-<step>/   the document embedder's snapshot (modeling.save_embedder)
      index-<step>/      the finished index (DenseIndex.save)

  The trainer only waits to write the snapshot and to load the finished index, or when
  `max_staleness` steps have passed since the snapshot (a bound on staleness; 0 = none).

Every swap is a `RefreshRecord`: the step of the snapshot, the step it was swapped in
(staleness = swap - snapshot), the build time, and the time the trainer was blocked. The builder
sends its own peak memory with every result and when it stops; the trainer records it as its
child's (realm_core/memory.py: getrusage cannot measure a spawned child).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import queue
import shutil
import signal
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from realm_core import distributed
from realm_core.blocks import BlockStore, embed_blocks
from realm_core.index import DenseIndex
from realm_core.io import atomic_dir
from realm_core.memory import note_child_peak, peak_rss_mb
from realm_core.modeling import Embedder, load_embedder, load_tokenizer, save_embedder
from realm_core.procs import children_ignore_sigint, die_with_parent


def build_index(
    doc: Embedder,
    store: BlockStore,
    device: torch.device,
    batch_size: int,
    progress: str | None = "refresh index",
    meta: dict | None = None,
    precision: str = "fp32",
) -> DenseIndex:
    """Re-embed every block with `doc` (kernel `precision`, realm_core/precision.py) and index the vectors (row i = block i)."""
    with torch.no_grad():
        embeddings = embed_blocks(doc, store, device, batch_size, progress=progress, precision=precision)
    return DenseIndex(embeddings, np.arange(len(store), dtype=np.int64), meta=meta)


@dataclass
class RefreshRecord:
    """One index in use: when its parameters were snapshotted and when the trainer started using it."""

    snapshot_step: int
    swap_step: int
    build_seconds: float
    wait_seconds: float  # trainer time blocked by this refresh

    @property
    def staleness(self) -> int:
        return self.swap_step - self.snapshot_step

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "staleness": self.staleness}

    def schedule(self) -> dict[str, int]:
        """When it was snapshotted and swapped in, without the timings: what a run's outputs record,
        since the same commit, params and seed must give the same files whatever the load (issue 16)."""
        return {"snapshot_step": self.snapshot_step, "swap_step": self.swap_step, "staleness": self.staleness}


class Refresher:
    """Decides when to snapshot (every `refresh_every` steps, 0 = never) and records every swap.

    Every build embeds with the kernel `precision` (realm_core/precision.py), from a copy of the
    snapshot's weights when it is not fp32."""

    def __init__(
        self, store: BlockStore, device: torch.device, batch_size: int, refresh_every: int, precision: str = "fp32"
    ):
        self.store, self.device, self.batch_size, self.refresh_every, self.precision = (
            store,
            device,
            batch_size,
            refresh_every,
            precision,
        )
        self.records: list[RefreshRecord] = []
        self.last_snapshot = 0
        self.pending: int | None = None  # step of the snapshot being built
        self._wait = 0.0  # trainer seconds blocked for the pending refresh so far

    def initial(self, doc: Embedder, step: int = 0, history: list[dict] | None = None) -> DenseIndex:
        """The first index, at step 0 or at the step training resumes from: every mode waits for it.

        `history` is `log()` of the interrupted run, so the records cover the whole training.
        """
        self.records = [RefreshRecord(**{k: v for k, v in r.items() if k != "staleness"}) for r in history or []]
        start = time.perf_counter()
        index = build_index(
            doc, self.store, self.device, self.batch_size, meta={"snapshot_step": step}, precision=self.precision
        )
        seconds = time.perf_counter() - start
        self.records.append(RefreshRecord(step, step, seconds, seconds))
        self.last_snapshot = step
        return index

    def step(self, doc: Embedder, step: int) -> DenseIndex | None:
        """Call before every training step: returns a new index to swap in, or None."""
        new = self._collect(step)
        if self.pending is None and self.refresh_every and step - self.last_snapshot >= self.refresh_every:
            start = time.perf_counter()
            self._submit(doc, step)
            self.pending, self.last_snapshot, self._wait = step, step, time.perf_counter() - start
            new = self._collect(step) or new
        return new

    def _collect(self, step: int) -> DenseIndex | None:
        if self.pending is None:
            return None
        start = time.perf_counter()
        done = self._poll(step)
        self._wait += time.perf_counter() - start
        if done is None:
            return None
        index, build_seconds = done
        self.records.append(RefreshRecord(self.pending, step, build_seconds, self._wait))
        self.pending = None
        return index

    def _submit(self, doc: Embedder, step: int) -> None:
        raise NotImplementedError

    def _poll(self, step: int) -> tuple[DenseIndex, float] | None:
        raise NotImplementedError

    def close(self) -> None:
        """Stop any background work (an unfinished refresh is dropped)."""

    def log(self) -> list[dict[str, float]]:
        return [r.as_dict() for r in self.records]


class SyncRefresher(Refresher):
    """Builds the new index inside `step`, before the trainer continues (staleness 0)."""

    def _submit(self, doc: Embedder, step: int) -> None:
        start = time.perf_counter()
        self._built = build_index(
            doc, self.store, self.device, self.batch_size, meta={"snapshot_step": step}, precision=self.precision
        )
        self._seconds = time.perf_counter() - start

    def _poll(self, step: int) -> tuple[DenseIndex, float] | None:
        return self._built, self._seconds


class AsyncRefresher(Refresher):
    """The index builder in a separate process; snapshot and index handed over through files.

    `threads` CPU threads go to the builder; while a build runs the trainer uses the others,
    and all of them again once the index is in. The builder process starts with the first
    (synchronous) build, so its start-up cost is hidden.
    """

    def __init__(
        self,
        store: BlockStore,
        device: torch.device,
        batch_size: int,
        refresh_every: int,
        *,
        work_dir: Path,
        lag: int = 0,
        max_staleness: int = 0,
        threads: int = 1,
        precision: str = "fp32",
    ):
        super().__init__(store, device, batch_size, refresh_every, precision)
        self.work_dir, self.lag, self.max_staleness, self.threads = Path(work_dir), lag, max_staleness, threads
        self.trainer_threads = torch.get_num_threads()
        shutil.rmtree(self.work_dir, ignore_errors=True)
        self.work_dir.mkdir(parents=True)
        self._proc: mp.process.BaseProcess | None = None

    def initial(self, doc: Embedder, step: int = 0, history: list[dict] | None = None) -> DenseIndex:
        self._start_builder()
        return super().initial(doc, step, history)

    def _start_builder(self) -> None:
        """Everything the builder needs goes through files: tokenizer, blocks, then snapshots."""
        self.store.tokenizer.save_pretrained(str(self.work_dir / "tokenizer"))
        blocks = self.store.source
        if blocks is None:  # an in-memory store (tests): write it once
            blocks = self.work_dir / "blocks.jsonl"
            blocks.write_text("".join(json.dumps(asdict(b)) + "\n" for b in self.store.blocks), encoding="utf-8")
        ctx = mp.get_context("spawn")  # fork is unsafe with torch's thread pools
        self._jobs, self._results = ctx.Queue(), ctx.Queue()
        args = (
            os.getpid(),
            str(self.work_dir),
            str(blocks),
            self.store.max_block_tokens,
            str(self.device),
            self.batch_size,
            self.precision,
            self.threads,
            self._jobs,
            self._results,
        )
        self._proc = ctx.Process(target=_builder_main, args=args, name="realm-index-builder", daemon=True)
        with children_ignore_sigint():  # the trainer stops it (close); a Ctrl-C goes to the trainer alone
            self._proc.start()

    def _submit(self, doc: Embedder, step: int) -> None:
        with atomic_dir(self.work_dir / f"embedder-{step}") as tmp:
            save_embedder(doc, tmp)
        self._jobs.put(step)
        torch.set_num_threads(max(1, self.trainer_threads - self.threads))

    def _poll(self, step: int) -> tuple[DenseIndex, float] | None:
        """The built index when it is due: with `lag`, at exactly step pending + lag (waiting for a late
        build), so which index each step uses never depends on load; else as soon as it is ready."""
        assert self.pending is not None and self._proc is not None
        if self.lag and step - self.pending < self.lag:
            return None
        must_wait = bool(self.lag) or (bool(self.max_staleness) and step - self.pending >= self.max_staleness)
        while True:
            try:
                kind, snapshot, payload, builder_peak_mb = (
                    self._results.get(timeout=1.0) if must_wait else self._results.get_nowait()
                )
                break
            except queue.Empty:
                if not self._proc.is_alive():
                    raise RuntimeError(
                        f"the index builder process died (exit code {self._proc.exitcode}); see its output above"
                    ) from None
                if not must_wait:
                    return None
        note_child_peak(builder_peak_mb)
        if kind == "error":
            raise RuntimeError(f"the index builder failed on the snapshot of step {snapshot}:\n{payload}")
        index = DenseIndex.load(self.work_dir / f"index-{snapshot}")
        shutil.rmtree(self.work_dir / f"index-{snapshot}", ignore_errors=True)
        torch.set_num_threads(self.trainer_threads)
        return index, float(payload)

    def close(self) -> None:
        if self._proc is not None:
            self._jobs.put(None)
            self._proc.join(timeout=10)
            if self._proc.is_alive():
                self._proc.terminate()
                self._proc.join()
            elif self._proc.exitcode == 0:
                self._note_last_peaks()
            self._proc = None
        torch.set_num_threads(self.trainer_threads)
        shutil.rmtree(self.work_dir, ignore_errors=True)

    def _note_last_peaks(self) -> None:
        """The peaks in the builder's last messages (a dropped build's, its peak when it stopped)."""
        while True:
            try:
                note_child_peak(self._results.get_nowait()[3])
            except queue.Empty:
                return


BUILDER_DELAY_ENV = "REALM_TEST_BUILDER_DELAY_SECONDS"


def planned_refreshes(steps: int, refresh_every: int, lag: int) -> int:
    """Indexes swapped in during `steps` training steps when step s + lag swaps in the snapshot of
    step s and the next snapshot waits for that swap (async with refresh_lag; sync: lag 0)."""
    if not refresh_every:
        return 0
    period = max(refresh_every, lag)
    return len(range(refresh_every + lag, steps, period))


def _next_job(jobs: mp.Queue, parent: int) -> int | None:
    """The next snapshot step, or None to stop: when told to, or when the trainer is gone (even SIGKILLed)."""
    while True:
        try:
            return jobs.get(timeout=2.0)
        except queue.Empty:
            if os.getppid() != parent:
                return None


def _builder_main(
    parent: int,
    work_dir: str,
    blocks: str,
    max_block_tokens: int,
    device: str,
    batch_size: int,
    precision: str,
    threads: int,
    jobs: mp.Queue,
    results: mp.Queue,
) -> None:
    """The index builder process: for each snapshot step it is sent, embed all blocks and save an index.

    `parent` is the trainer's pid, passed in: if the trainer died while this process started,
    os.getppid() here would already be the reaper's.
    """
    die_with_parent(signal.SIGTERM, parent)  # even mid-build, when the trainer is SIGKILLed (realm_core/procs.py)
    torch.set_num_threads(threads)
    delay = float(os.environ.get(BUILDER_DELAY_ENV, "0"))  # fault injection: a slow builder (tests of refresh_lag)
    work = Path(work_dir)
    store = BlockStore.load(Path(blocks), load_tokenizer(work / "tokenizer"), max_block_tokens)
    while (step := _next_job(jobs, parent)) is not None:
        try:
            start = time.perf_counter()
            time.sleep(delay)
            snapshot = work / f"embedder-{step}"
            index = build_index(
                load_embedder(snapshot).to(device),
                store,
                torch.device(device),
                batch_size,
                progress=None,
                meta={"snapshot_step": step},
                precision=precision,
            )
            index.save(work / f"index-{step}")
            shutil.rmtree(snapshot, ignore_errors=True)
            results.put(("done", step, time.perf_counter() - start, peak_rss_mb()))
        except Exception:  # report to the trainer, which raises with this traceback
            results.put(("error", step, traceback.format_exc(), peak_rss_mb()))
    results.put(("stopped", -1, None, peak_rss_mb()))


def make_refresher(
    refresh_every: int,
    mode: str,
    store: BlockStore,
    device: torch.device,
    batch_size: int,
    *,
    work_dir: Path,
    lag: int = 0,
    max_staleness: int = 0,
    threads: int = 1,
    precision: str = "fp32",
) -> Refresher:
    """The refresher for `pretrain.refresh_mode` (with `refresh_every: 0` nothing is ever rebuilt, so no builder process).

    Under torchrun rank 0 alone builds (its refresher as in one process, sync or async) and
    broadcasts each index it swaps in; the other ranks receive it at the same step (SharedRefresher).
    """
    if distributed.is_distributed() and not distributed.is_master():
        return SharedRefresher(None, store, device, batch_size, refresh_every, precision)
    local = _make_local_refresher(
        refresh_every,
        mode,
        store,
        device,
        batch_size,
        work_dir=work_dir,
        lag=lag,
        max_staleness=max_staleness,
        threads=threads,
        precision=precision,
    )
    if distributed.is_distributed():  # rank 0 builds and broadcasts
        return SharedRefresher(local, store, device, batch_size, refresh_every, precision)
    return local


def _make_local_refresher(
    refresh_every: int,
    mode: str,
    store: BlockStore,
    device: torch.device,
    batch_size: int,
    *,
    work_dir: Path,
    lag: int = 0,
    max_staleness: int = 0,
    threads: int = 1,
    precision: str = "fp32",
) -> Refresher:
    if mode == "sync" or refresh_every == 0:
        return SyncRefresher(store, device, batch_size, refresh_every, precision)
    if mode == "async":
        return AsyncRefresher(
            store,
            device,
            batch_size,
            refresh_every,
            work_dir=work_dir,
            lag=lag,
            max_staleness=max_staleness,
            threads=threads,
            precision=precision,
        )
    raise ValueError(f"refresh_mode must be async or sync, got {mode!r}")


class SharedRefresher(Refresher):
    """One index for every rank under torchrun: rank 0's refresher builds, the others receive.

    Rank 0 wraps the refresher one process would use (`inner`: sync, or async with its single
    builder process and work_dir); the other ranks pass None. At the first index and before
    every step rank 0 broadcasts whether it swapped a new index in, then its embeddings, ids and
    RefreshRecord, so all ranks retrieve from the same index from the same step on and keep the
    same records (rank 0's staleness and wait times). Receivers rebuild the exact flat index
    from the broadcast vectors; a refresh costs them one broadcast of N x d floats.
    """

    def __init__(
        self,
        inner: Refresher | None,
        store: BlockStore,
        device: torch.device,
        batch_size: int,
        refresh_every: int,
        precision: str = "fp32",
    ):
        super().__init__(store, device, batch_size, refresh_every, precision)
        self.inner = inner

    def initial(self, doc: Embedder, step: int = 0, history: list[dict] | None = None) -> DenseIndex:
        index = self.inner.initial(doc, step, history) if self.inner else None
        if self.inner is None:
            self.records = [RefreshRecord(**{k: v for k, v in r.items() if k != "staleness"}) for r in history or []]
        shared = self._share(index)
        assert shared is not None, "rank 0 always has an initial index"
        return shared

    def step(self, doc: Embedder, step: int) -> DenseIndex | None:
        return self._share(self.inner.step(doc, step) if self.inner else None)

    def _share(self, index: DenseIndex | None) -> DenseIndex | None:
        """Rank 0's new index (or None) on every rank; the receivers append its record."""
        header = torch.zeros(3, dtype=torch.long)
        record = torch.zeros(4, dtype=torch.float64)
        if self.inner is not None:
            self.records = self.inner.records
            if index is not None:
                header = torch.tensor([1, *index.embeddings.shape], dtype=torch.long)
                r = self.inner.records[-1]
                record = torch.tensor(
                    [r.snapshot_step, r.swap_step, r.build_seconds, r.wait_seconds], dtype=torch.float64
                )
        present, n, d = distributed.broadcast(header).tolist()
        if not present:
            return None
        record = distributed.broadcast(record).tolist()
        vectors = distributed.broadcast(
            torch.from_numpy(index.embeddings) if index is not None else torch.zeros(n, d, dtype=torch.float32)
        )
        ids = distributed.broadcast(
            torch.from_numpy(index.ids) if index is not None else torch.zeros(n, dtype=torch.long)
        )
        if self.inner is not None:
            return index
        self.records.append(RefreshRecord(int(record[0]), int(record[1]), record[2], record[3]))
        return DenseIndex(vectors.numpy(), ids.numpy(), meta={"snapshot_step": int(record[0])})

    def close(self) -> None:
        if self.inner is not None:
            self.inner.close()
