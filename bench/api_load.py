"""A load benchmark of `realm serve-api` on 127.0.0.1: latency and status under concurrent, partly hostile, load.

    .venv/bin/python bench/api_load.py                          # reports/api_load.{json,md,png}, 8 workers x 200
    .venv/bin/python bench/api_load.py --workspace ../other-run --workers 2 --requests 50 --out /tmp/load
    realm bench api_load --requests 50

It starts `realm serve-api` as a subprocess in the workspace (its cwd, so the server loads that
workspace's params.yaml, data/finetune and data/corpus/blocks.jsonl) on a free loopback port, waits
for GET /health, sends one warm-up question, then runs `--workers` threads, each with its own
keep-alive httpx.Client (trust_env=False: no proxy for loopback), sending `--requests` POST /ask
requests one after another. The server is stopped at the end whatever happens (terminate, then kill
after `--stop-timeout` seconds; on Linux it also gets SIGTERM if the bench itself is killed).

What the requests are is fixed by `--seed`: a share `--bad-share` of them (20% by default, split
evenly, at least one of each when there are bad requests at all) are bad bodies, the rest are
well-formed questions from QUESTIONS with top_k 1, 5 or 10:

  malformed         not JSON (truncated objects, single quotes, a trailing comma, bytes not UTF-8) -> 4xx
  empty             an empty body with content-type application/json                              -> 4xx
  oversize          a 100 kB JSON object with Content-Length (the body limit is 64 kB)             -> 413
  oversize_chunked  the same 100 kB sent chunked, with no Content-Length                           -> 413
  long_question     a 2,400-character question in a small body (the limit is 2,000 characters)    -> 422

A bad body must get a 4xx and never a 5xx; a well-formed question must get 200. Latency is the
client's wall time of one request (connect if needed, send, whole response read), so under
concurrency it includes the time a request waits for the server's lock (the API answers one
question at a time: flows/api.py). The percentiles are over the well-formed requests that got 200.
The JSON also holds the load average (os.getloadavg) at start, just before and just after the
load, and the server's peak RSS (VmHWM) and traceback count from its log.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.publish import publish  # noqa: E402

QUESTIONS = (
    "who wrote the nutcracker ballet?",
    "what is the capital of australia?",
    "when did the first world war begin?",
    "who painted the mona lisa?",
    "what is the largest planet in the solar system?",
    "who was the first president of the united states?",
    "in which country is the city of kyoto?",
    "what language is spoken in brazil?",
    "who discovered penicillin?",
    "when did the berlin wall fall?",
    "what is the chemical symbol for gold?",
    "who composed the four seasons?",
)
TOP_KS = (1, 5, 10)
MALFORMED = (
    b'{"question": "who wrote hamlet?"',  # truncated
    b"{'question': 'who wrote hamlet?'}",  # single quotes
    b'{"question": "who wrote hamlet?",}',  # trailing comma
    b"question=who+wrote+hamlet",  # a form body
    b'{"question": "\xff\xfe who?"}',  # not UTF-8
    b"[1, 2",
)
OVERSIZE_BYTES = 100 * 1024
LONG_QUESTION_CHARS = 2400
OK = "ok"
BAD_KINDS = ("malformed", "empty", "oversize", "oversize_chunked", "long_question")
KINDS = (OK, *BAD_KINDS)
RUN = "run `realm run` in it (the corpus and finetune stages write data/)"
ARTEFACTS = (  # what Answerer.from_project reads (realm_core/answer.py load_finetuned), and how to make it
    ("params.yaml", "give --workspace a project directory (a clone of this repository) that has run `realm run`"),
    ("data/corpus/blocks.jsonl", RUN),
    ("data/finetune/query", RUN),
    ("data/finetune/reader", RUN),
    ("data/finetune/index", RUN),
)


@dataclass(frozen=True)
class Planned:
    kind: str
    body: bytes
    top_k: int | None = None


@dataclass(frozen=True)
class Sample:
    worker: int
    kind: str
    status: int | None  # None: the client got no response (its error is in `error`)
    ms: float
    error: str | None = None


# ---------------------------------------------------------------------------- the requests


def _json(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def make_request(kind: str, rng: random.Random) -> Planned:
    if kind == OK:
        top_k = rng.choice(TOP_KS)
        return Planned(OK, _json({"question": rng.choice(QUESTIONS), "top_k": top_k}), top_k)
    if kind == "malformed":
        return Planned(kind, rng.choice(MALFORMED))
    if kind == "empty":
        return Planned(kind, b"")
    if kind in ("oversize", "oversize_chunked"):
        filler = OVERSIZE_BYTES - len(_json({"question": "who wrote hamlet? ", "top_k": 5}))
        return Planned(kind, _json({"question": "who wrote hamlet? " + "x" * filler, "top_k": 5}))  # OVERSIZE_BYTES
    if kind == "long_question":
        text = ""
        while len(text) < LONG_QUESTION_CHARS:
            text += rng.choice(QUESTIONS) + " "
        return Planned(kind, _json({"question": text[:LONG_QUESTION_CHARS]}))
    raise ValueError(f"unknown request kind {kind!r}")


def plan(workers: int, requests: int, seed: int, bad_share: float) -> list[list[Planned]]:
    """Each worker's requests in order: the bad kinds in equal numbers (at least one each if any), shuffled by `seed`."""
    total = workers * requests
    per_bad = max(1, round(total * bad_share / len(BAD_KINDS))) if bad_share > 0 else 0
    if total - per_bad * len(BAD_KINDS) < 1:
        raise SystemExit(
            f"error: {workers} x {requests} requests leave no well-formed question beside {per_bad} of each of the "
            f"{len(BAD_KINDS)} bad kinds; send more requests or lower --bad-share"
        )
    rng = random.Random(seed)
    kinds = [k for k in BAD_KINDS for _ in range(per_bad)]
    kinds += [OK] * (total - len(kinds))
    rng.shuffle(kinds)
    planned = [make_request(kind, rng) for kind in kinds]
    return [planned[w * requests : (w + 1) * requests] for w in range(workers)]


# ---------------------------------------------------------------------------- the server


def missing_artefact(workspace: Path) -> str | None:
    """One line naming the first artefact the API needs that `workspace` lacks, and how to make it; None if all are there."""
    for rel, fix in ARTEFACTS:
        if not (workspace / rel).exists():
            return f"error: {workspace / rel} is missing; realm serve-api needs it to load the fine-tuned model: {fix}"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_api_command(port: int) -> list[str]:
    """`realm serve-api` of this venv. The console script imports the installed (editable) package, not
    a flows/ that happens to sit in the workspace; `python -P` does the same when there is no script."""
    realm = Path(sys.executable).with_name("realm")
    head = [str(realm)] if realm.exists() else [sys.executable, "-P", "-c", "from flows.cli import app; app()"]
    return [*head, "serve-api", "--host", "127.0.0.1", "--port", str(port)]


def _die_with_parent() -> None:  # runs in the child before exec: SIGTERM when the bench dies, even by SIGKILL
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def stop(proc: subprocess.Popen, timeout: float) -> int:
    """Terminate `proc`, kill it if it has not exited after `timeout` seconds; return its exit code."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def _last_error(log: Path) -> str:
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    return (errors or lines or ["(no output)"])[-1]


@contextlib.contextmanager
def serve(
    workspace: Path, command: list[str], base_url: str, startup_timeout: float, stop_timeout: float
) -> Iterator[tuple[subprocess.Popen, Path]]:
    """Start `command` in `workspace`, wait until GET /health answers 200, yield the process and its log
    (stdout and stderr); always stop it, and delete the log, when the block ends."""
    import httpx

    log_fd, log_name = tempfile.mkstemp(prefix="api_load-server-", suffix=".log")
    log = Path(log_name)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = None
    try:
        with os.fdopen(log_fd, "wb") as out:  # a file, not a pipe: a pipe nobody reads would block the server
            proc = subprocess.Popen(
                command,
                cwd=workspace,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        deadline = time.monotonic() + startup_timeout
        while True:
            if proc.poll() is not None:
                raise SystemExit(
                    f"error: realm serve-api exited with code {proc.returncode} before answering /health: {_last_error(log)}"
                )
            try:
                if httpx.get(base_url + "/health", timeout=2.0, trust_env=False).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(
                    f"error: realm serve-api did not answer GET /health within {startup_timeout:.0f} s "
                    f"(--startup-timeout); its last line: {_last_error(log)}"
                )
            time.sleep(0.25)
        yield proc, log
    finally:
        if proc is not None:
            stop(proc, stop_timeout)
        with contextlib.suppress(OSError):
            log.unlink()


def _peak_rss_mb(pid: int) -> float | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return None


# ---------------------------------------------------------------------------- the load


def send(client, item: Planned) -> tuple[int | None, str | None]:
    """POST one planned request; its status (None if no response came) and the client's error, if any."""
    import httpx

    headers = {"content-type": "application/json"}
    if item.kind == "oversize_chunked":
        body = item.body
        content: Any = (body[i : i + 8192] for i in range(0, len(body), 8192))  # an iterator: httpx sends it chunked
    else:
        content = item.body
    try:
        return client.post("/ask", content=content, headers=headers).status_code, None
    except httpx.HTTPError as exc:
        return None, type(exc).__name__


def run_load(
    base_url: str, work: list[list[Planned]], timeout: float, stop_event: threading.Event
) -> tuple[list[Sample], float]:
    """Every worker's requests, each worker a thread with its own keep-alive client; the samples and wall seconds."""
    import httpx

    samples: list[list[Sample]] = [[] for _ in work]
    start = threading.Barrier(len(work) + 1)

    def worker(w: int) -> None:
        with httpx.Client(base_url=base_url, timeout=httpx.Timeout(timeout, connect=10.0), trust_env=False) as client:
            try:
                start.wait()
            except threading.BrokenBarrierError:  # the bench stopped before the load began
                return
            for item in work[w]:
                if stop_event.is_set():
                    return
                t0 = time.perf_counter()
                status, error = send(client, item)
                samples[w].append(Sample(w, item.kind, status, (time.perf_counter() - t0) * 1000, error))

    threads = [threading.Thread(target=worker, args=(w,), name=f"api-load-{w}", daemon=True) for w in range(len(work))]
    for t in threads:
        t.start()
    try:
        start.wait()
        t0 = time.perf_counter()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
    finally:
        start.abort()
        stop_event.set()  # on Ctrl-C or an error, the workers stop at their next request
    return [s for per in samples for s in per], wall


# ---------------------------------------------------------------------------- summary


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None, "mean_ms": None, "max_ms": None}
    q = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else [values[0]] * 99
    return {
        "p50_ms": round(q[49], 3),
        "p95_ms": round(q[94], 3),
        "p99_ms": round(q[98], 3),
        "mean_ms": round(statistics.fmean(values), 3),
        "max_ms": round(max(values), 3),
    }


def _status_key(s: Sample) -> str:
    return str(s.status) if s.status is not None else f"no response ({s.error})"


def summarise(samples: list[Sample]) -> dict[str, Any]:
    by_kind = {k: [s for s in samples if s.kind == k] for k in KINDS}
    status_counts = {k: dict(sorted(Counter(_status_key(s) for s in ss).items())) for k, ss in by_kind.items() if ss}
    answered = [s.ms for s in by_kind[OK] if s.status == 200]
    bad_not_4xx = {
        k: sum(1 for s in by_kind[k] if s.status is None or not 400 <= s.status < 500) for k in BAD_KINDS if by_kind[k]
    }
    return {
        "requests": len(samples),
        "well_formed": len(by_kind[OK]),
        "failed_well_formed": sum(1 for s in by_kind[OK] if s.status != 200),
        **percentiles(answered),
        "server_5xx": sum(1 for s in samples if s.status is not None and s.status >= 500),
        "no_response": sum(1 for s in samples if s.status is None),
        "bad_body_not_4xx": bad_not_4xx,
        "status_counts": status_counts,
        "latency_by_kind": {k: percentiles([s.ms for s in ss]) for k, ss in by_kind.items() if ss},
        "histogram_ms": answered,  # dropped from the JSON in main(); the plot reads it
    }


def problems(r: dict[str, Any]) -> list[str]:
    found = []
    if r["failed_well_formed"]:
        found.append(f"{r['failed_well_formed']} well-formed requests did not get 200")
    if r["server_5xx"]:
        found.append(f"{r['server_5xx']} responses were 5xx")
    found += [f"{n} {k} requests got no 4xx" for k, n in r["bad_body_not_4xx"].items() if n]
    if r["server"]["tracebacks_in_log"]:
        found.append(f"the server logged {r['server']['tracebacks_in_log']} tracebacks")
    return found


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:,.1f}"


def markdown(r: dict) -> str:
    la = lambda xs: " / ".join(f"{x:.2f}" for x in xs)  # noqa: E731
    lines = [
        "# `realm serve-api` under load (bench/api_load.py)",
        "",
        f"{r['workers']} workers x {r['requests_per_worker']} requests = {r['requests']} requests "
        f"({r['well_formed']} well-formed) to 127.0.0.1 in {r['wall_seconds']:.1f} s: "
        f"**{r['requests_per_second']:.1f} requests/s**, {r['well_formed_per_second']:.1f} answered questions/s. "
        f"Workspace `{r['workspace']}`, seed {r['seed']}, {r['cpus']} CPUs; server up in "
        f"{r['server']['startup_seconds']:.1f} s, warm-up question {r['server']['warmup_ms']:,.0f} ms, "
        f"peak RSS {_ms(r['server']['peak_rss_mb'])} MB.",
        "",
        "| kind | requests | status codes | p50 ms | p95 ms | p99 ms | max ms |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for kind, counts in r["status_counts"].items():
        lat = r["latency_by_kind"][kind]
        codes = ", ".join(f"{code}: {n}" for code, n in counts.items())
        lines.append(
            f"| {kind} | {sum(counts.values())} | {codes} | {_ms(lat['p50_ms'])} | {_ms(lat['p95_ms'])} "
            f"| {_ms(lat['p99_ms'])} | {_ms(lat['max_ms'])} |"
        )
    lines += [
        "",
        f"Well-formed questions answered 200: p50 **{_ms(r['p50_ms'])} ms**, p95 **{_ms(r['p95_ms'])} ms**, "
        f"p99 **{_ms(r['p99_ms'])} ms** (client wall time, queueing for the server's one-question-at-a-time lock included).",
        f"Failed well-formed: **{r['failed_well_formed']}**; 5xx: **{r['server_5xx']}**; no response: "
        f"{r['no_response']}; bad bodies without a 4xx: {sum(r['bad_body_not_4xx'].values())}.",
        f"Load average (1/5/15 min): {la(r['loadavg_start'])} at start, {la(r['loadavg_before'])} before the load, "
        f"{la(r['loadavg_after'])} after.",
        "",
        ("**OK**" if r["ok"] else "**PROBLEMS:** " + "; ".join(r["problems"])),
        "",
    ]
    return "\n".join(lines)


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = r.get("histogram_ms") or []
    fig, ax = plt.subplots(figsize=(7, 4))
    if values:
        ax.hist(values, bins=min(60, max(5, len(values) // 10)), color="tab:blue", alpha=0.8)
        for key, style in (("p50_ms", "-"), ("p95_ms", "--"), ("p99_ms", ":")):
            ax.axvline(r[key], color="black", ls=style, label=f"{key[:3]} {r[key]:,.0f} ms")
        ax.legend()
    ax.set(
        title=f"POST /ask latency, {r['workers']} workers x {r['requests_per_worker']} ({len(values)} answered)",
        xlabel="ms (client wall time)",
        ylabel="requests",
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------- main


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--workspace", type=Path, default=ROOT, help="project with trained artefacts (default: this repository)"
    )
    ap.add_argument("--workers", type=positive, default=8, help="concurrent clients (threads)")
    ap.add_argument("--requests", type=positive, default=200, help="requests per worker")
    ap.add_argument("--seed", type=int, default=0, help="which requests are bad, and which questions")
    ap.add_argument("--bad-share", type=float, default=0.2, help="share of bad bodies, split evenly over the kinds")
    ap.add_argument("--out", type=Path, default=ROOT / "reports", help="directory for api_load.{json,md,png}")
    ap.add_argument("--port", type=int, default=0, help="server port (0: a free one)")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds one request may take")
    ap.add_argument("--startup-timeout", type=float, default=300.0, help="seconds the server may take to load")
    ap.add_argument("--stop-timeout", type=float, default=10.0, help="seconds between terminate and kill")
    args = ap.parse_args(argv)
    if not 0 <= args.bad_share < 1:
        ap.error(f"--bad-share must be in [0, 1), got {args.bad_share}")
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    import httpx

    t_start = time.perf_counter()
    workspace = args.workspace.resolve()
    missing = missing_artefact(workspace)
    if missing:
        raise SystemExit(missing)
    work = plan(args.workers, args.requests, args.seed, args.bad_share)
    port = args.port or free_port()
    base_url = f"http://127.0.0.1:{port}"
    command = serve_api_command(port)
    loadavg_start = list(os.getloadavg())
    t_server = time.perf_counter()
    with serve(workspace, command, base_url, args.startup_timeout, args.stop_timeout) as (proc, log):
        startup = time.perf_counter() - t_server
        health = httpx.get(base_url + "/health", timeout=10.0, trust_env=False).json()
        t0 = time.perf_counter()
        warm = httpx.post(
            base_url + "/ask", json={"question": QUESTIONS[0], "top_k": 5}, timeout=args.timeout, trust_env=False
        )
        warmup_ms = (time.perf_counter() - t0) * 1000
        if warm.status_code != 200:
            raise SystemExit(f"error: the warm-up question got {warm.status_code}: {warm.text[:300]}")
        loadavg_before = list(os.getloadavg())
        samples, wall = run_load(base_url, work, args.timeout, threading.Event())
        loadavg_after = list(os.getloadavg())
        peak_rss = _peak_rss_mb(proc.pid)
        log_text = log.read_text(errors="replace")
        pid = proc.pid
    summary = summarise(samples)
    results: dict[str, Any] = {
        "bench": "api_load",
        "workspace": str(workspace),
        "seed": args.seed,
        "workers": args.workers,
        "requests_per_worker": args.requests,
        **summary,
        "kinds": {k: sum(1 for per in work for p in per if p.kind == k) for k in KINDS},
        "wall_seconds": wall,
        "requests_per_second": len(samples) / wall if wall else None,
        "well_formed_per_second": summary["well_formed"] / wall if wall else None,
        "loadavg_start": loadavg_start,
        "loadavg_before": loadavg_before,
        "loadavg_after": loadavg_after,
        "cpus": os.cpu_count(),
        "client": f"httpx {httpx.__version__}: one keep-alive httpx.Client per worker thread",
        "server": {
            "command": ["realm" if Path(command[0]).name == "realm" else command[0], *command[1:]],
            "pid": pid,
            "exit_code": proc.returncode,
            "startup_seconds": startup,
            "health": health,
            "warmup_ms": warmup_ms,
            "peak_rss_mb": peak_rss,
            "tracebacks_in_log": log_text.count("Traceback (most recent call last)"),
        },
        "limits": {"oversize_bytes": OVERSIZE_BYTES, "long_question_chars": LONG_QUESTION_CHARS},
        "latency": "client wall time per request; p50/p95/p99 over the well-formed requests that got 200",
        "seconds": time.perf_counter() - t_start,
    }
    results["problems"] = problems(results)
    results["ok"] = not results["problems"]
    return results


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    results = run(args)
    out = args.out / "api_load.json"
    histogram = results.pop("histogram_ms")
    publish(
        results,
        [out, out.with_suffix(".md"), out.with_suffix(".png")],
        markdown,
        lambda r, path: plot({**r, "histogram_ms": histogram}, path),
        None,
    )
    return results


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks: the server is stopped
    try:
        sys.exit(0 if main()["ok"] else 1)
    except KeyboardInterrupt:
        sys.exit("interrupted: the server was stopped, nothing was written")
