"""Resumable training state: a training loop saves every N steps and resumes after a kill.

DVC deletes a stage's outputs before running it and has no checkpoints (DESIGN.md 2), so a
training stage keeps its state in the untracked `runs/<stage>/` folder and deletes it once its
outputs are saved. A loop uses it like this:

    ckpt = Checkpointer(Path("runs/ict/retriever"), every=20, fingerprint=fingerprint(config, [blocks]))
    state = TrainState({"retriever": retriever}, optimizer, scheduler, {"batches": rng})
    start = ckpt.restore(state)                  # 0, or the step of the newest checkpoint
    for step in range(start, steps):
        ...one optimisation step...
        ckpt.maybe_save(step + 1, state, final=step + 1 == steps)

With the same seed, a resumed loop ends with exactly the weights of an uninterrupted one as long
as all of its randomness comes from the RNGs in `TrainState.rngs` and the global generators
(python `random`, numpy, torch CPU and CUDA: dropout draws from torch's), which are all saved.

One checkpoint is a directory `step-000040/` holding
    model-<name>.safetensors  the weights of each named module (tied weights handled by safetensors)
    optimizer.safetensors     optimizer state tensors, flattened keys "<i>.<name>" (exp_avg, step, ...)
    rng.safetensors           torch CPU/CUDA generator states and named torch.Generators
    state.json                step, data position, `extra`, fingerprint, scheduler state, optimizer
                              param_groups and non-tensor state, python/numpy RNG states, and the size
                              and sha256 of every file above; written last
It is written into a temporary sibling, fsynced and renamed (realm_core.io.atomic_dir), so a directory named `step-*` is
always complete; the newest `keep` (2) are kept. Nothing is pickled: safetensors and JSON only.

Under torchrun (realm_core/distributed.py) every rank calls `maybe_save` and `restore`: the
weights, optimizer and loop RNGs are the same on all ranks, so rank 0 alone writes them, with
each rank's torch generator state (dropout differs per rank) gathered into rng.safetensors as
`rank.<r>.torch.cpu` / `rank.<r>.torch.cuda`; every rank restores the same files and its own
generator. Rank 0 restores first (it deletes stale or foreign checkpoints), then the others.

A checkpoint belongs to what produced it: its fingerprint hashes the loop's parameters, seed and
input artefacts. `restore` discards checkpoints with another fingerprint (with a warning) and
starts at step 0; a corrupt or truncated checkpoint raises InputError naming the file and the fix.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

from realm_core import distributed
from realm_core.io import InputError, atomic_dir, fsync, pid_alive

FORMAT = 1
STATE_FILE = "state.json"
STEP_DIR = re.compile(r"^step-(\d+)$")
TEMP_DIR = re.compile(r"^\.step-\d+\.tmp-(\d+)$")
Rng = random.Random | np.random.Generator | torch.Generator

logger = logging.getLogger(__name__)
CHECKPOINT_DISK_FULL_FIX = (
    "free space there, or save checkpoints less often (<stage>.checkpoint_every in params.yaml; 0 = off)"
)


@dataclass
class TrainState:
    """Everything a training loop mutates: saved and restored together."""

    modules: dict[str, torch.nn.Module]
    optimizer: torch.optim.Optimizer | None = None
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    rngs: dict[str, Rng] = field(default_factory=dict)  # the loop's own generators, by name


# ---------------------------------------------------------------------------- fingerprint


def _file_sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def fingerprint(config: dict[str, Any], inputs: Iterable[Path] = ()) -> str:
    """Hash of a loop's parameters and the bytes of its input files or directories.

    A checkpoint made with other params, another seed or other inputs would resume into a run
    that neither configuration describes; the fingerprint lets `restore` refuse it.
    """
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for path in map(Path, inputs):
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            h.update(f"\0{file.relative_to(path) if path.is_dir() else file.name}\0".encode())
            h.update(_file_sha256(file).encode() if file.exists() else b"<missing>")
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------- finding checkpoints


def checkpoint_step(path: Path) -> int:
    return int(STEP_DIR.match(path.name).group(1))


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints (renamed `step-*` directories with a state file), oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.is_dir() and STEP_DIR.match(p.name) and (p / STATE_FILE).exists()]
    return sorted(found, key=checkpoint_step)


def latest_checkpoint(directory: Path) -> Path | None:
    """The newest complete checkpoint in `directory`, or None."""
    found = list_checkpoints(directory)
    return found[-1] if found else None


def resume_points(directory: Path) -> dict[str, int]:
    """{loop: step of its newest checkpoint} for `directory` and its subdirectories (one per loop).

    The stage's tracking reads this to tag a resumed run; the loop itself may still refuse a
    checkpoint whose fingerprint differs.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return {}
    candidates = [directory, *(p for p in sorted(directory.iterdir()) if p.is_dir())]
    out = {}
    for d in candidates:
        latest = latest_checkpoint(d)
        if latest is not None:
            out["." if d == directory else d.name] = checkpoint_step(latest)
    return out


# ---------------------------------------------------------------------------- RNG and optimizer state


def _python_state(rng: random.Random | None) -> list:
    version, internal, gauss = rng.getstate() if rng is not None else random.getstate()
    return [version, list(internal), gauss]


def _set_python_state(rng: random.Random | None, state: list) -> None:
    value = (state[0], tuple(state[1]), state[2])
    rng.setstate(value) if rng is not None else random.setstate(value)


def _numpy_json(state: dict) -> dict:
    """A numpy bit-generator state as JSON (MT19937 keeps its key in a uint32 array)."""
    inner = dict(state["state"])
    if isinstance(inner.get("key"), np.ndarray):
        inner["key"] = inner["key"].tolist()
    return {**state, "state": inner}


def _numpy_state(state: dict) -> dict:
    inner = dict(state["state"])
    if isinstance(inner.get("key"), list):
        inner["key"] = np.asarray(inner["key"], dtype=np.uint32)
    return {**state, "state": inner}


def _rng_parts(rngs: dict[str, Rng]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"torch.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    plain: dict[str, Any] = {
        "python": _python_state(None),
        "numpy": _numpy_json(np.random.get_state(legacy=False)),
        "named": {},
    }
    for name, rng in rngs.items():
        if isinstance(rng, random.Random):
            plain["named"][name] = {"kind": "python", "state": _python_state(rng)}
        elif isinstance(rng, np.random.Generator):
            plain["named"][name] = {"kind": "numpy", "state": _numpy_json(rng.bit_generator.state)}
        elif isinstance(rng, torch.Generator):
            plain["named"][name] = {"kind": "torch"}
            tensors[f"generator.{name}"] = rng.get_state()
        else:
            raise TypeError(
                f"rng {name!r}: expected random.Random, numpy Generator or torch.Generator, got {type(rng).__name__}"
            )
    return tensors, plain


def _rank_rng_tensors() -> dict[str, torch.Tensor]:
    """Under torchrun, every rank's torch CPU (and current CUDA device) generator state, gathered
    (a collective: all ranks call it); empty in one process, where "torch.cpu" says it all."""
    if not distributed.is_distributed():
        return {}
    out = {f"rank.{r}.torch.cpu": t for r, t in enumerate(distributed.all_gather_rows(torch.get_rng_state()))}
    if torch.cuda.is_available():
        out.update(
            {f"rank.{r}.torch.cuda": t for r, t in enumerate(distributed.all_gather_rows(torch.cuda.get_rng_state()))}
        )
    return out


def _set_rngs(rngs: dict[str, Rng], tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> None:
    random.setstate((plain["python"][0], tuple(plain["python"][1]), plain["python"][2]))
    np.random.set_state(_numpy_state(plain["numpy"]))
    torch.set_rng_state(tensors["torch.cpu"])
    cuda = [
        tensors[k]
        for k in sorted((k for k in tensors if k.startswith("torch.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    ]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    mine = f"rank.{distributed.rank()}.torch"
    if f"{mine}.cpu" in tensors:  # saved under torchrun: this rank's own dropout stream
        torch.set_rng_state(tensors[f"{mine}.cpu"])
    if f"{mine}.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors[f"{mine}.cuda"])
    for name, rng in rngs.items():
        saved = plain["named"].get(name)
        if saved is None:
            raise KeyError(f"the checkpoint has no state for rng {name!r}")
        if isinstance(rng, random.Random):
            _set_python_state(rng, saved["state"])
        elif isinstance(rng, np.random.Generator):
            rng.bit_generator.state = _numpy_state(saved["state"])
        else:
            rng.set_state(tensors[f"generator.{name}"])


def _optimizer_parts(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors keyed "<position>.<name>" for safetensors; param ids, plain values and groups for JSON."""
    sd = optimizer.state_dict()
    tensors, plain, ids = {}, {}, list(sd["state"])
    for pos, pid in enumerate(ids):
        for key, value in sd["state"][pid].items():
            if torch.is_tensor(value):
                tensors[f"{pos}.{key}"] = value.detach().cpu().contiguous()
            else:
                plain.setdefault(str(pos), {})[key] = value
    return tensors, {"ids": ids, "plain": plain, "param_groups": sd["param_groups"]}


def _load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[Any, dict[str, Any]] = {
        pid: dict(meta["plain"].get(str(pos), {})) for pos, pid in enumerate(meta["ids"])
    }
    for key, value in tensors.items():
        pos, name = key.split(".", 1)
        state[meta["ids"][int(pos)]][name] = value
    if len(meta["param_groups"]) != len(optimizer.param_groups):
        raise ValueError(
            f"{len(meta['param_groups'])} parameter groups saved, the optimizer has {len(optimizer.param_groups)}"
        )
    groups = []
    for saved, live in zip(meta["param_groups"], optimizer.param_groups):  # JSON turned tuples (betas) into lists
        groups.append({k: tuple(v) if isinstance(live.get(k), tuple) else v for k, v in saved.items()})
    optimizer.load_state_dict({"state": state, "param_groups": groups})


class Checkpointer:
    """Saves a TrainState every `every` steps into `directory` and restores the newest one.

    `every` = 0 turns it off (restore returns 0, nothing is written). After `restore`,
    `extra` and `data_position` hold what the restored checkpoint was saved with.
    `before_save(step)` runs before each save: the stage flushes its buffered step metrics there,
    so whatever a checkpoint covers is also in the tracker when the process is killed later.
    """

    def __init__(
        self,
        directory: Path,
        every: int,
        fingerprint: str,
        keep: int = 2,
        before_save: Callable[[int], None] | None = None,
    ):
        if every < 0:
            raise ValueError(f"checkpoint every must be >= 0 (0 = off), got {every}")
        self.directory, self.every, self.fingerprint, self.keep = Path(directory), every, fingerprint, max(1, keep)
        self.before_save = before_save
        self.extra: dict[str, Any] = {}
        self.data_position: Any = None
        self.resumed_step = 0

    @property
    def enabled(self) -> bool:
        return self.every > 0

    def _corrupt(self, file: Path, why: str) -> InputError:
        return InputError(
            f"{file}: corrupt or truncated checkpoint ({why}); delete {self.directory} to start this training over "
            f"(or delete {file.parent} to resume from the checkpoint before it)"
        )

    # ------------------------------------------------------------------ save

    def maybe_save(
        self,
        step: int,
        state: TrainState,
        *,
        data_position: Any = None,
        extra: dict[str, Any] | None = None,
        final: bool = False,
    ) -> Path | None:
        """Save after `step` completed steps when it is a multiple of `every` (or `final`).

        Under torchrun all ranks call it; rank 0 writes (returns the path), the others return None.
        """
        if not self.enabled or (step % self.every and not final):
            return None
        rank_rngs = _rank_rng_tensors()
        if not distributed.is_master():
            return None
        return self.save(step, state, data_position=data_position, extra=extra, rank_rngs=rank_rngs)

    def save(
        self,
        step: int,
        state: TrainState,
        *,
        data_position: Any = None,
        extra: dict[str, Any] | None = None,
        rank_rngs: dict[str, torch.Tensor] | None = None,
    ) -> Path:
        """Write checkpoint `step-<step>` atomically and keep only the newest `keep`."""
        if self.before_save is not None:
            self.before_save(step)
        final = self.directory / f"step-{step:06d}"
        with atomic_dir(final, durable=True, disk_full_fix=CHECKPOINT_DISK_FULL_FIX) as tmp:
            meta = self._write_files(tmp, step, state, data_position, extra or {}, rank_rngs or {})
            _write_json_durably(tmp / STATE_FILE, meta)
        for old in list_checkpoints(self.directory)[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def _write_files(
        self,
        tmp: Path,
        step: int,
        state: TrainState,
        data_position: Any,
        extra: dict[str, Any],
        rank_rngs: dict[str, torch.Tensor],
    ) -> dict[str, Any]:
        files: list[str] = []
        for name, module in state.modules.items():
            save_model(module, str(tmp / f"model-{name}.safetensors"))
            files.append(f"model-{name}.safetensors")
        meta: dict[str, Any] = {
            "format": FORMAT,
            "step": step,
            "fingerprint": self.fingerprint,
            "data_position": data_position,
            "extra": extra,
        }
        if state.optimizer is not None:
            tensors, meta["optimizer"] = _optimizer_parts(state.optimizer)
            save_file(tensors, str(tmp / "optimizer.safetensors"))
            files.append("optimizer.safetensors")
        if state.scheduler is not None:
            meta["scheduler"] = state.scheduler.state_dict()
        tensors, meta["rng"] = _rng_parts(state.rngs)
        save_file({**tensors, **rank_rngs}, str(tmp / "rng.safetensors"))
        files.append("rng.safetensors")
        for name in files:
            fsync(tmp / name)
        meta["files"] = {
            name: {"bytes": (tmp / name).stat().st_size, "sha256": _file_sha256(tmp / name)} for name in files
        }
        json.dumps(meta)  # fail here, not halfway through the write, if something is not JSON
        return meta

    # ------------------------------------------------------------------ restore

    def restore(self, state: TrainState) -> int:
        """Load the newest checkpoint into `state` (in place); return the step to continue from.

        Under torchrun all ranks call it: rank 0 first (it may delete stale temporaries and a
        checkpoint of other params), then, after a barrier, the others read the same files.
        """
        if not self.enabled:
            return 0
        if not distributed.is_master():
            distributed.barrier()
            return self._restore(state)
        step = self._restore(state)
        distributed.barrier()
        return step

    def _restore(self, state: TrainState) -> int:
        if distributed.is_master():
            self._remove_stale_temps()
        path = latest_checkpoint(self.directory)
        if path is None:
            return 0
        meta = self._read_meta(path)
        if meta.get("fingerprint") != self.fingerprint:
            logger.warning(
                "%s was made with other params or inputs (fingerprint %s, expected %s); discarding it and starting at step 0",
                path,
                meta.get("fingerprint"),
                self.fingerprint,
            )
            self.discard()
            return 0
        self._verify(path, meta)
        self._load(path, meta, state)
        self.resumed_step, self.extra, self.data_position = (
            int(meta["step"]),
            meta.get("extra") or {},
            meta.get("data_position"),
        )
        logger.info("resumed from %s (step %d)", path, self.resumed_step)
        return self.resumed_step

    def _read_meta(self, path: Path) -> dict[str, Any]:
        file = path / STATE_FILE
        try:
            meta = json.loads(file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise self._corrupt(file, f"not valid JSON: {exc}") from None
        if (
            not isinstance(meta, dict)
            or meta.get("format") != FORMAT
            or not isinstance(meta.get("files"), dict)
            or not isinstance(meta.get("step"), int)
        ):
            raise self._corrupt(file, f"not a format-{FORMAT} checkpoint state")
        return meta

    def _verify(self, path: Path, meta: dict[str, Any]) -> None:
        """Every file present with the size and sha256 recorded when it was written."""
        for name, expected in meta["files"].items():
            file = path / name
            if not file.exists():
                raise self._corrupt(file, "file missing")
            if file.stat().st_size != expected["bytes"]:
                raise self._corrupt(file, f"{file.stat().st_size} bytes, {expected['bytes']} were written")
            if _file_sha256(file) != expected["sha256"]:
                raise self._corrupt(file, "sha256 differs from the one recorded at save time")

    def _load(self, path: Path, meta: dict[str, Any], state: TrainState) -> None:
        file = path
        try:
            for name, module in state.modules.items():
                file = path / f"model-{name}.safetensors"
                load_model(module, str(file), strict=True)
            if state.optimizer is not None:
                file = path / "optimizer.safetensors"
                _load_optimizer(state.optimizer, load_file(str(file)), meta["optimizer"])
            if state.scheduler is not None:
                file = path / STATE_FILE
                state.scheduler.load_state_dict(meta["scheduler"])
            file = path / "rng.safetensors"
            _set_rngs(state.rngs, load_file(str(file)), meta["rng"])
        except (SafetensorError, RuntimeError, KeyError, ValueError, TypeError, OSError) as exc:
            raise self._corrupt(file, f"does not fit this training loop: {exc}") from None

    # ------------------------------------------------------------------ housekeeping

    def _remove_stale_temps(self) -> None:
        """Half-written checkpoints of processes that died while saving."""
        if not self.directory.is_dir():
            return
        for p in self.directory.iterdir():
            m = TEMP_DIR.match(p.name)
            if m and (int(m.group(1)) == os.getpid() or not pid_alive(int(m.group(1)))):
                shutil.rmtree(p, ignore_errors=True)

    def discard(self) -> None:
        """Delete every checkpoint of this loop."""
        shutil.rmtree(self.directory, ignore_errors=True)


def _write_json_durably(path: Path, obj: Any) -> None:
    with path.open("w", encoding="utf-8") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
