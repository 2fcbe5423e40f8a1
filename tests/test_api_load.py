"""The API load bench (bench/api_load.py): a real `realm serve-api` subprocess over the tiny random-weight
project of tests/tiny_qa.py, 2 workers x 10 requests, and the parts that make it trustworthy: the
request plan, the summary's verdicts, the missing-artefact error and the server being stopped.

Every expected value is derived here (from the plan, the API's limits or the samples), never copied
from reports/api_load.json.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import api_load as al
from flows.api import MAX_BODY_BYTES, AskRequest
from realm_core.answer import MAX_QUESTION_CHARS
from tests.tiny_qa import make_finetuned_project

REQUIRED = (
    "requests",
    "failed_well_formed",
    "p50_ms",
    "p95_ms",
    "p99_ms",
    "status_counts",
    "server_5xx",
    "loadavg_before",
    "loadavg_after",
    "workers",
    "requests_per_worker",
    "wall_seconds",
    "requests_per_second",
)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return make_finetuned_project(tmp_path_factory.mktemp("api_load"))


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


def test_the_bench_loads_a_real_server_and_every_bad_body_gets_a_4xx(project, tmp_path, capsys):
    out = tmp_path / "out"
    started = time.monotonic()
    returned = al.main(["--workspace", str(project), "--workers", "2", "--requests", "10", "--out", str(out)])
    assert time.monotonic() - started < 60
    r = json.loads((out / "api_load.json").read_text())
    assert r == json.loads(json.dumps(returned))
    assert all(key in r for key in REQUIRED), [key for key in REQUIRED if key not in r]

    expected = [p.kind for per in al.plan(2, 10, 0, 0.2) for p in per]
    assert r["requests"] == len(expected) == 20 and r["workers"] == 2 and r["requests_per_worker"] == 10
    assert r["well_formed"] == expected.count(al.OK)
    for kind, counts in r["status_counts"].items():  # every request sent was answered and counted once
        assert sum(counts.values()) == expected.count(kind), kind
    assert r["failed_well_formed"] == 0 and r["status_counts"][al.OK] == {"200": r["well_formed"]}
    assert r["server_5xx"] == 0 and r["no_response"] == 0
    for kind in al.BAD_KINDS:
        codes = r["status_counts"][kind]
        assert codes and all(400 <= int(code) < 500 for code in codes), (kind, codes)
    assert set(r["status_counts"]["oversize"]) == set(r["status_counts"]["oversize_chunked"]) == {"413"}
    assert set(r["status_counts"]["long_question"]) == {"422"}

    assert 0 < r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"] <= r["max_ms"]
    assert r["wall_seconds"] > 0 and r["requests_per_second"] == pytest.approx(20 / r["wall_seconds"])
    assert len(r["loadavg_before"]) == len(r["loadavg_after"]) == 3
    assert r["ok"] is True and r["problems"] == [] and r["server"]["tracebacks_in_log"] == 0
    assert r["server"]["health"]["blocks"] == 10 and r["server"]["command"][:2] == ["realm", "serve-api"]
    assert not _alive(r["server"]["pid"])  # stopped at the end
    assert (out / "api_load.md").read_text() in capsys.readouterr().out
    assert (out / "api_load.png").stat().st_size > 0


def test_the_plan_is_fixed_by_the_seed_and_its_bad_bodies_break_the_limits():
    a, b = al.plan(3, 7, 5, 0.2), al.plan(3, 7, 5, 0.2)
    assert a == b and [len(per) for per in a] == [7, 7, 7]
    assert [p.kind for per in al.plan(3, 7, 6, 0.2) for p in per] != [p.kind for per in a for p in per]
    kinds = [p.kind for per in al.plan(8, 200, 0, 0.2) for p in per]
    assert all(kinds.count(k) == 64 for k in al.BAD_KINDS) and kinds.count(al.OK) == 1600 - 5 * 64
    assert [p.kind for per in al.plan(2, 10, 0, 0.0) for p in per] == [al.OK] * 20

    items = [p for per in al.plan(4, 50, 1, 0.3) for p in per]
    for p in items:
        if p.kind == al.OK:
            request = AskRequest.model_validate_json(p.body)
            assert request.question in al.QUESTIONS and request.top_k == p.top_k
        elif p.kind == "malformed":
            with pytest.raises(ValueError):
                json.loads(p.body)
        elif p.kind == "empty":
            assert p.body == b""
        elif p.kind in ("oversize", "oversize_chunked"):
            assert len(p.body) == 100 * 1024 > MAX_BODY_BYTES
        else:
            assert p.kind == "long_question" and len(p.body) < MAX_BODY_BYTES
            assert len(json.loads(p.body)["question"]) > MAX_QUESTION_CHARS
    with pytest.raises(SystemExit, match="no well-formed question"):
        al.plan(1, 5, 0, 0.2)


def test_the_summary_flags_failures_and_5xx():
    samples = [
        al.Sample(0, al.OK, 200, 10.0),
        al.Sample(0, al.OK, 200, 30.0),
        al.Sample(1, al.OK, 500, 5.0),
        al.Sample(1, al.OK, None, 1.0, "ReadTimeout"),
        al.Sample(0, "empty", 422, 1.0),
        al.Sample(1, "oversize", 200, 2.0),
        al.Sample(1, "malformed", 502, 2.0),
    ]
    s = al.summarise(samples)
    assert s["requests"] == 7 and s["well_formed"] == 4 and s["failed_well_formed"] == 2
    assert s["server_5xx"] == 2 and s["no_response"] == 1
    assert s["bad_body_not_4xx"] == {"empty": 0, "oversize": 1, "malformed": 1}
    assert s["status_counts"][al.OK] == {"200": 2, "500": 1, "no response (ReadTimeout)": 1}
    assert (s["p50_ms"], s["max_ms"]) == (20.0, 30.0)  # over the 200s only
    found = al.problems({**s, "server": {"tracebacks_in_log": 0}})
    assert len(found) == 4 and any("2 well-formed" in p for p in found)


def test_a_workspace_without_the_model_is_one_error_line_naming_the_path(project, tmp_path):
    (tmp_path / "params.yaml").write_text((project / "params.yaml").read_text())
    with pytest.raises(SystemExit) as exc:
        al.main(["--workspace", str(tmp_path), "--requests", "10", "--out", str(tmp_path / "out")])
    message = str(exc.value.code)
    assert message.startswith("error: ") and "\n" not in message
    assert str(tmp_path / "data" / "corpus" / "blocks.jsonl") in message and "`realm run`" in message
    assert not (tmp_path / "out").exists()


FAKE_SERVER = """
import signal, sys
from http.server import BaseHTTPRequestHandler, HTTPServer
if sys.argv[2] == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
class Health(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"{}")
    def log_message(self, *args):
        pass
HTTPServer(("127.0.0.1", int(sys.argv[1])), Health).serve_forever()
"""


@pytest.mark.parametrize("mode, signal_", [("polite", signal.SIGTERM), ("stubborn", signal.SIGKILL)])
def test_the_server_is_stopped_after_an_exception_killed_if_it_ignores_terminate(tmp_path, mode, signal_):
    script = tmp_path / "fake_server.py"
    script.write_text(FAKE_SERVER)
    port = al.free_port()
    command, url = [sys.executable, str(script), str(port), mode], f"http://127.0.0.1:{port}"
    with pytest.raises(RuntimeError, match="mid-load"):
        with al.serve(tmp_path, command, url, startup_timeout=30, stop_timeout=1.0) as (proc, log):
            assert proc.poll() is None and log.exists()
            raise RuntimeError("mid-load")
    assert proc.returncode == -signal_ and not _alive(proc.pid) and not log.exists()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_realm_serve_api_ends_on_every_signal_and_leaves_no_process(project, sig):
    """Issue 16, item 2 for `realm serve-api` (the other commands: tests/test_no_orphans.py)."""
    import psutil

    port = al.free_port()
    realm = str(Path(sys.executable).parent / "realm")
    proc = subprocess.Popen([realm, "serve-api", "--port", str(port)], cwd=project, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not any(
        c.laddr.port == port for c in psutil.Process(proc.pid).net_connections(kind="tcp")
    ):
        assert proc.poll() is None, "serve-api exited before it listened"
        time.sleep(0.3)
    tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    proc.send_signal(sig)
    proc.wait(timeout=20)
    _, alive = psutil.wait_procs(tree, timeout=5)
    assert alive == [] and not _alive(proc.pid)
