"""Write the real training questions for fine-tuning, split so that none is an evaluation question.

    .venv/bin/python bench/training_questions.py [--data ../shared/data] [--out data/external/qa_train_real.jsonl]

DPR's NQ dev (carved from NQ train), WebQuestions train, and the train half of SQuAD dev's
articles (realm_core/benchmarks.squad_article_half; bench/quality.py scores SQuAD-open on the
other half), minus any question whose text is in an evaluation set. The output is NQ-open JSON
lines for `corpus.qa_train_extra` (profiles/quality.yaml lists it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from realm_core.benchmarks import training_questions  # noqa: E402
from realm_core.io import write_jsonl  # noqa: E402


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=ROOT / "data" / "external" / "qa_train_real.jsonl")
    args = parser.parse_args(argv)
    questions, counts = training_questions(args.data)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out, [{"question": q.question, "answer": list(q.answers)} for q in questions])
    for name, n in counts.items():
        print(f"{n:6d}  {name}")
    print(f"wrote {len(questions)} questions to {args.out}")
    return args.out


if __name__ == "__main__":
    main()
