"""The bad-input table (issue #6, part 3): each row is one malformed input that must give ONE
clear error (InputError or ParamsError, no chained traceback) naming the file, the line where
there is one, and the fix.

Rows already tested elsewhere are not repeated here: corpus TSV/JSONL readers (empty file,
wrong delimiter, missing column, invalid UTF-8, duplicate ids, empty text) in test_corpus.py,
a question with no answers in test_corpus.py, an invalid CuratedTREC regex in test_metrics.py,
unknown and wrongly typed params in test_orchestration.py, inconsistent index files in
test_index.py. This file covers the rest, at the level a user meets them (`realm ask`'s loader,
the stages' loaders), over a copy of the tiny fine-tuned project of tests/tiny_qa.py.

Issue #16 added: a non-BERT backbone and one without config.json (refused by `realm run`'s
params check, before any stage), pretrain.top_k over the corpus size (at the start of the ict
stage), a corpus ICT cannot train on / without salient spans / without cloze questions (at the
end of the corpus stage), a full disk under every writer (weights, checkpoints, JSON, a stage's
output directory), and, outside the table, UTF-8 byte order marks (read as if absent) and the
HTTP API's limits (413 for a large body, 422 that never echoes the input).

Print the table "input -> error message":  python -m tests.test_bad_inputs
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from safetensors import SafetensorError

from realm_core.answer import Answerer
from realm_core.checkpoint import Checkpointer, TrainState
from realm_core.config import CorpusParams, ParamsError, load_params
from realm_core.corpus import read_jsonl_corpus, read_tsv
from realm_core.corpus_files import build_corpus, finish_corpus
from realm_core.index import DenseIndex
from realm_core.io import InputError, write_json
from realm_core.logging import null_logger
from realm_core.modeling import backbone_dir, load_bert, load_embedder, load_tokenizer, save_embedder
from realm_core.paths import Paths
from realm_core.questions import load_qa_files, read_qa_jsonl, read_questions
from tasks.training import finetune_task
from tests.tiny import make_blocks
from tests.tiny_qa import make_finetuned_project

ROOT = Path(__file__).resolve().parents[1]
GOOD_QA = '{"question": "Who taught in Athens?", "answer": ["Socrates"]}\n'


@dataclass(frozen=True)
class Bad:
    """One malformed input: `make(project)` breaks a fresh copy of the tiny project and returns
    the call that must fail and the file its message must name; `line` and `fix` words too."""

    input: str
    make: Callable[[Path], tuple[Callable[[], object], Path]]
    line: int | None
    fix: str


def _write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return path


def _ask(project: Path) -> Callable[[], object]:
    return lambda: Answerer.from_project(project)


def _set_param(project: Path, section: str, key: str, value: object) -> None:
    params = load_params(project / "params.yaml").model_dump()
    params[section][key] = value
    (project / "params.yaml").write_text(json.dumps(params))  # JSON is YAML


# ----------------------------------------------------------------------------- the rows


def qa_empty(p: Path):
    bad = _write(p / "qa_train.jsonl", "")
    return lambda: load_qa_files(str(bad), str(_write(p / "qa_dev.jsonl", GOOD_QA))), bad


def qa_bad_utf8(p: Path):
    bad = _write(p / "qa.jsonl", GOOD_QA.encode() + b'{"question": "Caf\xe9?", "answer": ["x"]}\n')
    return lambda: read_qa_jsonl(bad), bad


def qa_no_question(p: Path):
    bad = _write(p / "qa.jsonl", GOOD_QA + '{"answer": ["Paris"]}\n')
    return lambda: read_qa_jsonl(bad), bad


def qa_empty_answer_string(p: Path):
    bad = _write(p / "qa.jsonl", GOOD_QA + GOOD_QA + '{"question": "Capital of Italy?", "answer": ["  "]}\n')
    return lambda: read_qa_jsonl(bad), bad


def params_not_yaml(p: Path):
    bad = _write(p / "params.yaml", "seed: 1\nfinetune:\n  steps: 3\n lr: 0.1\n")
    return lambda: load_params(bad), bad


def params_section_not_mapping(p: Path):
    bad = _write(p / "params.yaml", "seed: 1\n\nfinetune: 3\n")
    return lambda: load_params(bad), bad


def backbone_missing(p: Path):
    _set_param(p, "model", "backbone", str(p / "no-such-bert"))
    return _ask(p), p / "no-such-bert"


def backbone_without_vocab(p: Path):
    for name in ("vocab.txt", "tokenizer.json"):
        (p / "tinybert" / name).unlink()
    return _ask(p), p / "tinybert"


def backbone_pickle_only(p: Path):
    (p / "tinybert" / "model.safetensors").unlink()
    _write(p / "tinybert" / "pytorch_model.bin", b"\x80\x04not loaded")  # never unpickled
    return lambda: load_bert(p / "tinybert"), p / "tinybert"


def backbone_corrupt_safetensors(p: Path):
    weights = p / "tinybert" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    return lambda: load_bert(p / "tinybert"), p / "tinybert"


def finetune_dir_missing_query(p: Path):
    shutil.rmtree(p / "data" / "finetune" / "query")
    return _ask(p), p / "data" / "finetune" / "query"


def reader_truncated_safetensors(p: Path):
    weights = p / "data" / "finetune" / "reader" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return _ask(p), weights


def query_realm_json_corrupt(p: Path):
    bad = _write(p / "data" / "finetune" / "query" / "realm.json", '{"class": "Embedder", "dim": 1')
    return _ask(p), bad


def reader_dir_holds_another_model(p: Path):
    reader = p / "data" / "finetune" / "reader"
    shutil.rmtree(reader)
    shutil.copytree(p / "data" / "finetune" / "query", reader)
    return _ask(p), reader


def index_faiss_corrupt(p: Path):
    _write(p / "data" / "finetune" / "index" / "index.faiss", b"not a faiss index")
    return _ask(p), p / "data" / "finetune" / "index"


def index_over_other_blocks(p: Path):
    index = DenseIndex.load(p / "data" / "finetune" / "index")
    DenseIndex(index.embeddings[:5], np.arange(5, dtype=np.int64)).save(p / "data" / "finetune" / "index")
    return _ask(p), p / "data" / "finetune" / "index"


def block_longer_than_limit(p: Path):
    blocks = p / "data" / "corpus" / "blocks.jsonl"
    rows = [json.loads(line) for line in blocks.read_text().splitlines()]
    rows[3]["text"] = " ".join([rows[3]["text"]] * 8)  # ~100 wordpieces > corpus.max_block_tokens = 64
    blocks.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return _ask(p), blocks


def block_missing_key(p: Path):
    blocks = p / "data" / "corpus" / "blocks.jsonl"
    rows = [json.loads(line) for line in blocks.read_text().splitlines()]
    del rows[1]["sentences"]
    blocks.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return _ask(p), blocks


def backbone_gpt2(p: Path):
    config = p / "tinybert" / "config.json"
    config.write_text(
        json.dumps({**json.loads(config.read_text()), "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    )
    from flows.pipeline import check_overrides  # what `realm run` checks before DVC starts any stage

    return lambda: check_overrides(p / "params.yaml", []), p / "tinybert"


def backbone_without_config(p: Path):
    (p / "tinybert" / "config.json").unlink()
    return _ask(p), p / "tinybert"


def pretrain_top_k_over_corpus(p: Path):
    _set_param(p, "pretrain", "top_k", 50)  # the tiny corpus has 10 blocks
    from tasks.training import train_ict_task  # the first thing the ict stage does

    return lambda: train_ict_task.fn(
        load_params(p / "params.yaml"), Paths(p), p / "out", null_logger
    ), p / "data" / "corpus" / "blocks.jsonl"


def corpus_of_short_passages(p: Path):
    bad = _write(p / "short.tsv", "id\ttext\ttitle\n1\tHello world\tA\n2\tGood day\tB\n3\tParis rocks\tC\n")
    _set_param(p, "corpus", "source", str(bad))
    params = load_params(p / "params.yaml")
    return lambda: build_corpus(
        params.corpus, load_tokenizer(backbone_dir(params.model.backbone)), 0, p / "out", p
    ), bad


def corpus_without_salient_spans(p: Path):
    source = _write(p / "plain.jsonl", "")  # only named: the blocks are given
    qa = _write(p / "qa.jsonl", GOOD_QA)
    blocks = [{**b, "spans": []} for b in make_blocks()]
    params = CorpusParams(source=str(source), qa_train=str(qa), qa_dev=str(qa))
    return lambda: finish_corpus(blocks, params, load_tokenizer(p / "tinybert"), 0, p / "out", 10, p), source


def corpus_without_cloze_questions(p: Path):
    source = _write(p / "few.jsonl", "")
    params = CorpusParams(source=str(source), qa_fraction=0.01)  # 1% of 30 candidate sentences: none held out
    return lambda: finish_corpus(make_blocks(), params, load_tokenizer(p / "tinybert"), 0, p / "out", 10, p), source


def passage_of_5_mb(p: Path):
    ok = json.dumps({"id": "a", "title": "A", "text": "Socrates taught in Athens."})
    huge = json.dumps({"id": "b", "title": "B", "text": "word " * 1_000_000})  # 5 MB: spaCy's E088 in the NLP
    source = _write(p / "huge.jsonl", f"{ok}\n{huge}\n")
    return lambda: read_jsonl_corpus(source), source


def qa_answers_nowhere_in_the_corpus(p: Path):
    paths = Paths(p)
    _write(paths.qa_train, '{"question": "Who founded Zyxqor?", "answer": ["Vendelmarr Quistbow"]}\n')
    params = load_params(p / "params.yaml")
    return lambda: finetune_task.fn(params, paths, p / "data" / "finetune", null_logger), paths.qa_train


ENOSPC = OSError(errno.ENOSPC, "No space left on device")
SAFETENSORS_ENOSPC = SafetensorError(
    'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
)


def disk_full_saving_weights(p: Path):
    embedder, out = load_embedder(p / "data" / "finetune" / "query"), p / "data" / "pretrain" / "retriever" / "query"

    def save():
        with mock.patch(
            "realm_core.modeling.save_file", side_effect=SAFETENSORS_ENOSPC
        ):  # what safetensors raises on a full disk
            save_embedder(embedder, out)

    return save, out / "model.safetensors"


def disk_full_saving_a_checkpoint(p: Path):
    checkpointer = Checkpointer(p / "runs" / "ict" / "retriever", every=1, fingerprint="f")
    state = TrainState({"query": load_embedder(p / "data" / "finetune" / "query")})

    def save():
        with mock.patch("realm_core.checkpoint.save_model", side_effect=ENOSPC):
            checkpointer.save(1, state)

    return save, p / "runs" / "ict" / "retriever" / "step-000001"


def disk_full_writing_json(p: Path):
    path = p / "metrics" / "ict.json"

    def write():
        with mock.patch.object(Path, "write_text", side_effect=ENOSPC):
            write_json(path, {"ict_loss": 1.0})

    return write, path


def disk_full_saving_an_index(p: Path):
    final = p / "data" / "finetune" / "index"
    index = DenseIndex.load(final)

    def save():
        with mock.patch("numpy.save", side_effect=ENOSPC):  # inside atomic_dir, which names the output
            index.save(final)

    return save, final


ROWS = [
    Bad("QA file (corpus.qa_train) empty", qa_empty, 1, "expected lines"),
    Bad("QA file with invalid UTF-8 on line 2", qa_bad_utf8, 2, "re-encode the file as UTF-8"),
    Bad("QA line without a question", qa_no_question, 2, "must be a non-empty string"),
    Bad("QA line whose answer is a blank string", qa_empty_answer_string, 3, "every answer must be a non-empty string"),
    Bad("params.yaml not valid YAML (bad indentation)", params_not_yaml, 4, "fix the syntax there"),
    Bad("params.yaml section given a number", params_section_not_mapping, 3, "valid dictionary"),
    Bad("model.backbone: a directory that does not exist", backbone_missing, None, "give a local directory"),
    Bad(
        "backbone directory without vocab.txt / tokenizer.json",
        backbone_without_vocab,
        None,
        "copy the checkpoint's vocabulary files",
    ),
    Bad(
        "backbone with pickled pytorch_model.bin only",
        backbone_pickle_only,
        None,
        "pickled pytorch_model.bin is refused",
    ),
    Bad("backbone model.safetensors truncated", backbone_corrupt_safetensors, None, "fix or replace the directory"),
    Bad("fine-tuned query embedder directory missing", finetune_dir_missing_query, None, "`realm run`"),
    Bad(
        "fine-tuned reader model.safetensors truncated",
        reader_truncated_safetensors,
        None,
        "rerun the stage that writes it",
    ),
    Bad("fine-tuned realm.json cut short (corrupt)", query_realm_json_corrupt, None, "rerun the stage that writes it"),
    Bad("reader directory holds an Embedder", reader_dir_holds_another_model, None, "give the SpanReader's directory"),
    Bad("index.faiss corrupted", index_faiss_corrupt, None, "`dvc repro -f finetune`"),
    Bad(
        "index of 5 vectors for 10 blocks (size mismatch)",
        index_over_other_blocks,
        None,
        "rebuild it (`dvc repro -f finetune`)",
    ),
    Bad("blocks.jsonl block longer than corpus.max_block_tokens", block_longer_than_limit, 4, "`dvc repro -f corpus`"),
    Bad("blocks.jsonl record without 'sentences'", block_missing_key, 2, "`dvc repro corpus`"),
    Bad(
        "model.backbone: a GPT-2 directory (realm run's params check)",
        backbone_gpt2,
        None,
        "the accepted model_type is 'bert'",
    ),
    Bad("model.backbone: a directory without config.json", backbone_without_config, None, "has no config.json"),
    Bad(
        "pretrain.top_k=50 over a corpus of 10 blocks (ict stage start)",
        pretrain_top_k_over_corpus,
        None,
        "set pretrain.top_k to at most 10",
    ),
    Bad(
        "corpus of passages under 3 words (no ICT sentences)",
        corpus_of_short_passages,
        None,
        "give passages of several full sentences each",
    ),
    Bad(
        "corpus without a named entity or date (no pseudo-queries)",
        corpus_without_salient_spans,
        None,
        "give passages of ordinary prose",
    ),
    Bad("corpus that yields no cloze questions", corpus_without_cloze_questions, None, "raise corpus.qa_fraction"),
    Bad("corpus JSONL line holding a 5 MB passage", passage_of_5_mb, 2, "split it into passages"),
    Bad(
        "training questions whose answers occur in no block (fine-tuning loss 0)",
        qa_answers_nowhere_in_the_corpus,
        None,
        "give questions about this corpus",
    ),
    Bad("disk full while saving weights (safetensors)", disk_full_saving_weights, None, "no space left on device"),
    Bad("disk full while saving a checkpoint", disk_full_saving_a_checkpoint, None, "checkpoint_every"),
    Bad("disk full while writing a JSON file", disk_full_writing_json, None, "free space on that disk"),
    Bad(
        "disk full while saving an index (inside a stage's atomic output directory)",
        disk_full_saving_an_index,
        None,
        "free space on that disk",
    ),
]


def copy_project(template: Path, dest: Path) -> Path:
    """A fresh copy whose params.yaml points at the copy's own backbone (rows may break it)."""
    shutil.copytree(template, dest)
    _set_param(dest, "model", "backbone", str(dest / "tinybert"))
    return dest


def run_row(row: Bad, project: Path) -> tuple[BaseException | None, Path]:
    """Break the project as the row says and return the exception raised (None if nothing was)."""
    action, named = row.make(project)
    try:
        action()
    except Exception as exc:  # noqa: BLE001 - the test checks the type
        return exc, named
    return None, named


# ----------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    return make_finetuned_project(tmp_path_factory.mktemp("bad-inputs-template"))


@pytest.fixture()
def project(template, tmp_path):
    return copy_project(template, tmp_path / "project")


def test_the_intact_project_loads(project):
    """The rows below fail because of what they break, not because the template is broken."""
    assert len(Answerer.from_project(project).model.store) == 10


@pytest.mark.parametrize("row", ROWS, ids=[r.make.__name__ for r in ROWS])
def test_bad_input_gives_one_clear_error(row: Bad, project: Path):
    exc, named = run_row(row, project)
    assert isinstance(exc, (InputError, ParamsError)), f"{row.input}: got {type(exc).__name__}: {exc}"
    message = str(exc)
    assert exc.__cause__ is None and "Traceback" not in message
    assert str(named) in message, f"the message does not name {named}: {message}"
    if row.line is not None:
        assert f"{named}:{row.line}:" in message, message
    assert row.fix in message, message


def test_realm_stage_on_bad_params_exits_nonzero_and_keeps_earlier_outputs(tmp_path):
    """CLI level: `realm stage corpus` in a copy with a wrongly typed param stops before Prefect
    starts, with one message naming params.yaml:line, and the previous outputs stay as they were."""
    lines = (ROOT / "params.yaml").read_text().splitlines()
    at = next(i for i, line in enumerate(lines) if line.strip().startswith("max_block_tokens:"))
    lines[at] = "  max_block_tokens: lots"
    (tmp_path / "params.yaml").write_text("\n".join(lines) + "\n")
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    earlier = _write(tmp_path / "data" / "corpus" / "blocks.jsonl", '{"id": 0, "title": "kept"}\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run(
        [sys.executable, "-m", "flows.cli", "stage", "corpus"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1
    assert f"{tmp_path / 'params.yaml'}:{at + 1}: 'corpus.max_block_tokens'" in out.stderr
    assert "Traceback" not in out.stderr and out.stderr.count("error:") == 1
    assert earlier.read_text() == '{"id": 0, "title": "kept"}\n'
    assert sorted(p.name for p in (tmp_path / "data" / "corpus").iterdir()) == ["blocks.jsonl"]


def test_realm_stage_refuses_a_gpt2_backbone_before_prefect_starts(tmp_path):
    """CLI level: `realm stage ict` with model.backbone a GPT-2 directory stops with one message
    naming the directory and its model_type, before any flow runs (ICT used to train a random BERT)."""
    gpt2 = _write(
        tmp_path / "gpt2" / "config.json",
        json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_layer": 12}),
    ).parent
    params = load_params(ROOT / "params.yaml").model_dump()
    params["model"]["backbone"] = str(gpt2)
    (tmp_path / "params.yaml").write_text(json.dumps(params))
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run(
        [sys.executable, "-m", "flows.cli", "stage", "ict"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1
    assert f"{gpt2} holds model_type 'gpt2'" in out.stderr and "the accepted model_type is 'bert'" in out.stderr
    assert "Traceback" not in out.stderr and out.stderr.count("error:") == 1
    assert not (tmp_path / "data").exists()


def test_a_full_disk_leaves_no_temporary_file_behind(project):
    """The writer that hit ENOSPC removes its half-written temporary file or checkpoint directory."""
    for make in (disk_full_writing_json, disk_full_saving_a_checkpoint):
        action, named = make(project)
        with pytest.raises(InputError):
            action()
        leftovers = sorted(p.name for p in named.parent.iterdir()) if named.parent.exists() else []
        assert leftovers == [], leftovers


BOM = b"\xef\xbb\xbf"  # UTF-8 byte order mark, as Excel and Notepad write it
SQUAD = {
    "data": [
        {
            "title": "Athens",
            "paragraphs": [
                {
                    "context": "Socrates taught in Athens.",
                    "qas": [
                        {
                            "id": "q1",
                            "question": "Who taught in Athens?",
                            "answers": [{"text": "Socrates", "answer_start": 0}],
                        }
                    ],
                }
            ],
        }
    ]
}


@pytest.mark.parametrize(
    "name, text, read",
    [
        (
            "corpus.tsv",
            "id\ttext\ttitle\n1\tSocrates taught in Athens.\tAthens\n",
            read_tsv,
        ),  # the header was read as passage '\ufeffid'
        ("headless.tsv", "1\tSocrates taught in Athens.\tAthens\n", read_tsv),
        ("corpus.jsonl", '{"id": 1, "title": "Athens", "text": "Socrates taught in Athens."}\n', read_jsonl_corpus),
        ("qa.jsonl", GOOD_QA, read_questions),
        ("qa.txt", GOOD_QA, read_questions),  # DrQA .txt: still sniffed as JSON lines
        ("qa.csv", "question\tanswers\nWho taught in Athens?\t['Socrates']\n", read_questions),
        ("squad.json", json.dumps(SQUAD), read_questions),
        ("qa_train.jsonl", GOOD_QA, read_qa_jsonl),
    ],
)
def test_a_utf8_byte_order_mark_reads_as_if_it_were_absent(tmp_path, name, text, read):
    plain = read(_write(tmp_path / "plain" / name, text))
    assert read(_write(tmp_path / "bom" / name, BOM + text.encode("utf-8"))) == plain and plain


def _api_client(**kwargs):
    from fastapi.testclient import TestClient

    from flows.api import create_app

    return TestClient(create_app(answerer=object(), **kwargs))  # no request below reaches the model


def test_api_refuses_a_20_mb_body_with_413_without_echoing_it():
    huge = b'{"question": "' + b"x" * 20_000_000 + b'"}'

    def chunks():  # no Content-Length: the limit is counted as the body arrives
        for i in range(0, len(huge), 1 << 20):
            yield huge[i : i + (1 << 20)]

    with _api_client() as client:
        declared = client.post("/ask", content=huge, headers={"content-type": "application/json"})
        chunked = client.post("/ask", content=chunks(), headers={"content-type": "application/json"})
        small = client.post("/ask", json={"question": "Who?", "top_k": 0})
    assert "content-length" not in chunked.request.headers
    for response in (declared, chunked):
        assert response.status_code == 413 and len(response.content) < 300
        assert "request body over 65,536 bytes" in response.json()["detail"]
    assert small.status_code == 422  # under the limit, the request reaches validation as before


def test_api_validation_errors_never_echo_the_input():
    from realm_core.answer import MAX_QUESTION_CHARS, check_question

    long = "why " * 15_000  # 60 kB: under the body limit, over the question limit
    with _api_client() as client:
        response = client.post("/ask", json={"question": long, "top_k": 3})
    assert response.status_code == 422 and len(response.content) < 300
    assert "why why" not in response.text and f"at most {MAX_QUESTION_CHARS} characters" in response.text
    with pytest.raises(InputError, match="more than 2,000; ask a shorter question"):
        check_question(long)  # `realm ask` refuses it too, before the model loads


# ----------------------------------------------------------------------------- the table


def markdown_table() -> str:
    """Run every row on a fresh copy of the tiny project; one table line per input."""
    out = ["| input | error message |", "|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        template = make_finetuned_project(Path(tmp) / "template")
        for i, row in enumerate(ROWS):
            exc, _ = run_row(row, copy_project(template, Path(tmp) / f"p{i}"))
            message = f"{type(exc).__name__}: {exc}".replace(tmp, "<tmp>").replace("\n", " ").replace("|", "\\|")
            out.append(f"| {row.input} | {message} |")
    return "\n".join(out)


if __name__ == "__main__":
    print(markdown_table())
