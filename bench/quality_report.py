"""The markdown tables and the recall@k plot of bench/quality.py, from its results dict (quality.json).

The first table has the layout of REALM's Table 2 (Guu et al. 2020): the zero-shot retrieval
recall@5 of each retriever; the reader table gives the exact match of each reader.
"""

from __future__ import annotations

from pathlib import Path

LABELS = {"cloze": "cloze (held out)", "squad_open": "SQuAD-open", "vital_linked": "vital-linked"}
SOURCES = {"nq": "NQ", "wq": "WQ", "trec": "CT (regex)", "squad": "SQuAD"}


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return [_row(head), "|" + "---|" * len(head), *(_row(r) for r in rows)]


def _label(name: str) -> str:
    return LABELS.get(name, name)


def retriever_tables(results: dict) -> list[str]:
    benches = list(results["benchmarks"])
    head = ["retriever", *(f"{_label(b)} R@5 {rule}" for b in benches for rule in ("gold", "answer")), "what it is"]
    rows = [
        [name, *(f"{e[b][rule]['recall@5']:.1f}" for b in benches for rule in ("gold", "answer")), e["description"]]
        for name, e in results["retrievers"].items()
    ]
    lines = ["## Zero-shot retrieval recall@5 (REALM Table 2's retrieval column)", "", *_table(head, rows), ""]
    head = [
        "retriever",
        *(f"{_label(b)} {rule} R@1 / 5 / 20" for b in benches for rule in ("gold", "answer")),
        "seconds",
    ]
    rows = [
        [
            name,
            *(
                " / ".join(f"{e[b][rule][f'recall@{k}']:.1f}" for k in (1, 5, 20))
                for b in benches
                for rule in ("gold", "answer")
            ),
            f"{e['seconds']:.0f}",
        ]
        for name, e in results["retrievers"].items()
    ]
    lines += ["## Recall@1 / 5 / 20 in detail", "", *_table(head, rows), ""]
    for b in benches:
        tags = list(results["benchmarks"][b]["questions_by_source"])
        if len(tags) < 2:
            continue
        counts = results["benchmarks"][b]["questions_by_source"]
        head = ["retriever", *(f"{SOURCES.get(t, t)} ({counts[t]} q)" for t in tags)]
        rows = [
            [
                name,
                *(
                    f"{e[b]['by_source'][t]['answer_recall@5']:.1f} ({e[b]['by_source'][t]['gold_recall@5']:.1f})"
                    for t in tags
                ),
            ]
            for name, e in results["retrievers"].items()
        ]
        lines += [f"## {_label(b)} by source: recall@5 by answer (by gold passage)", "", *_table(head, rows), ""]
    return lines


def reader_table(results: dict) -> list[str]:
    benches = list(results["benchmarks"])
    tags = [t for t in SOURCES if any(t in results["benchmarks"][b]["questions_by_source"] for b in benches)]
    multi = [b for b in benches if len(results["benchmarks"][b]["questions_by_source"]) > 1]
    head = [
        "reader",
        *(f"{_label(b)} EM ({results['benchmarks'][b]['reader_questions']} q)" for b in benches),
        *(f"{_label(b)} {SOURCES[t]}" for b in multi for t in tags),
        "what it is",
    ]
    rows = [
        [
            name,
            *(f"{e[b]['em']:.2f}" for b in benches),
            *(f"{e[b]['by_source'][t]:.1f}" if t in e[b]["by_source"] else "-" for b in multi for t in tags),
            e["description"],
        ]
        for name, e in results["readers"].items()
    ]
    return ["## Readers: exact match (regex match for CuratedTREC)", "", *_table(head, rows), ""]


def comparison_table(results: dict) -> list[str]:
    """The paired differences a - b with their bootstrap 95% intervals, in points."""
    rows = [
        [
            _label(c["set"]),
            c["metric"],
            f"{c['a']} - {c['b']}",
            f"{c['a_score']:.1f} - {c['b_score']:.1f}",
            f"{c['diff']:+.1f}",
            f"[{c['ci_low']:+.1f}, {c['ci_high']:+.1f}]",
            str(c["questions"]),
            "yes" if c["ci_low"] > 0 or c["ci_high"] < 0 else "no",
        ]
        for c in results.get("comparisons", [])
    ]
    if not rows:
        return []
    head = [
        "set",
        "metric",
        "a - b",
        "scores",
        "difference (points)",
        "95% CI (paired bootstrap)",
        "questions",
        "separates",
    ]
    return ["## Paired comparisons (the paper's claims: a should beat b)", "", *_table(head, rows), ""]


def notes(results: dict) -> list[str]:
    cfg, bench = results.get("config", {}), results["benchmarks"]
    sizes = "; ".join(
        f"{_label(b)}: {v['passages']} passages ({v['passages_over_256_wordpieces']} longer than "
        f"{cfg.get('passage_tokens', 256)} wordpieces), {v['questions']} questions, {v['questions_with_an_answer_passage']} "
        f"with some passage holding an answer"
        for b, v in bench.items()
    )
    overlap = results.get("training_overlap_by_title", {})
    return [
        "## How to read this",
        "",
        f"- Corpora: {sizes}. Each passage is one retrieval unit; dense encoders read `[CLS] title [SEP] passage [SEP]` "
        f"cut to {cfg.get('passage_tokens', 256)} wordpieces, BM25 and MiniLM read `title text`.",
        "- **gold**: a retrieved passage is the question's gold passage (SQuAD: the paragraph it was written on; "
        "vital-linked: a passage it is linked to). **answer**: a retrieved passage's text (title excluded) contains an answer "
        "by DPR's has_answer rule: NFD, lower-case, DPR SimpleTokenizer tokens, the answer's token sequence occurs contiguously; "
        "CuratedTREC answers are regexes searched anywhere in the passage (DPR's regex rule).",
        "- Reader EM: SQuAD/ORQA normalisation (NFD, lower, strip punctuation and articles, squash spaces), max over references; "
        "CuratedTREC: case-insensitive regex matched at the start of the prediction (ORQA/DrQA). "
        f"Readers are scored on a seeded sample of at most {cfg.get('reader_questions', '?')} questions per benchmark.",
        "- all-MiniLM-L6-v2 was trained contrastively on NQ-train, SQuAD-train, TriviaQA and PAQ question-passage pairs "
        "(not these dev/test questions): it is a supervised QA retriever, not a zero-shot baseline. The pipeline's retrievers "
        "start from its first layers, so `random_init` / `random_init_ict` (BERT weights re-initialised) test the unsupervised claim.",
        f"- The pipeline's models: {cfg.get('pipeline', 'see params.yaml')} "
        f"(passages of each corpus whose title is a training-block title: {overlap or 'n/a'}); SQuAD paragraphs are a transfer "
        "to other Wikipedia text.",
        "- The closed-book reader gives REALM's encoder the null block only and fills 1-3 [MASK] slots: in place of a cloze "
        "question's own [MASK], after any other question; an extractive reader cannot answer from the null block at all.",
        "- `orqa` is ORQA's recipe on the same corpus and questions: the ICT retriever and the ict stage's encoder, fine-tuned "
        "(`finetune.init: ict`) with no REALM pre-training; `realm_finetuned` starts from REALM pre-training.",
    ]


def markdown_report(results: dict) -> str:
    cfg = results.get("config", {})
    head = [
        "# Retrieval and reader quality: REALM beside its baselines (bench/quality.py)",
        "",
        f"{'quick mode (subsets)' if cfg.get('quick') else 'full run'}; {results.get('seconds', 0):.0f} s wall time on "
        f"{cfg.get('threads', '?')} CPU threads. All numbers in %.",
        "",
    ]
    return (
        "\n".join(
            [*head, *retriever_tables(results), *reader_table(results), *comparison_table(results), *notes(results)]
        )
        + "\n"
    )


def plot_recall_curves(results: dict, path: Path) -> Path:
    """recall@k for k = 1..depth: one panel per benchmark and relevance rule, one line per retriever."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    benches = list(results["benchmarks"])
    fig, axes = plt.subplots(len(benches), 2, figsize=(11, 4 * len(benches)), squeeze=False)
    for row, b in enumerate(benches):
        for col, rule in enumerate(("gold", "answer")):
            ax = axes[row, col]
            for name, entry in results["retrievers"].items():
                curve = entry[b]["curve"][rule]
                ax.plot(
                    range(1, len(curve) + 1), curve, label=name, linestyle="--" if name in ("bm25", "minilm") else "-"
                )
            ax.set_xscale("log")
            ax.set_xlabel("k")
            ax.set_ylabel(f"recall@k by {rule} (%)")
            ax.set_title(
                f"{_label(b)} ({results['benchmarks'][b]['passages']} passages, {results['benchmarks'][b]['questions']} q)"
            )
            ax.grid(alpha=0.3, which="both")
            ax.set_ylim(0, 100)
    axes[0, 1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_comparisons(results: dict, path: Path) -> Path:
    """The paired differences a - b with their bootstrap 95% intervals, one panel per question set:
    a claim holds where the whole interval is right of 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results.get("comparisons", [])
    sets = list(dict.fromkeys(c["set"] for c in rows)) or ["(none)"]
    height = max(len([c for c in rows if c["set"] == s]) for s in sets) if rows else 1
    fig, axes = plt.subplots(1, len(sets), figsize=(5.5 * len(sets), 0.45 * height + 1.6), squeeze=False)
    for ax, name in zip(axes[0], sets):
        mine = [c for c in rows if c["set"] == name]
        ys = range(len(mine))
        ax.errorbar(
            [c["diff"] for c in mine],
            ys,
            xerr=[[c["diff"] - c["ci_low"] for c in mine], [c["ci_high"] - c["diff"] for c in mine]],
            fmt="o",
            color="black",
            ecolor="tab:blue",
            capsize=3,
        )
        ax.axvline(0, color="tab:red", lw=1)
        ax.set_yticks(
            list(ys),
            [f"{c['metric'].replace('zero_shot_recall_at_', 'R@')}: {c['a']} - {c['b']}" for c in mine],
            fontsize=8,
        )
        ax.invert_yaxis()
        ax.set_xlabel("difference in points (95% CI, paired bootstrap)")
        ax.set_title(f"{_label(name)} ({mine[0]['questions'] if mine else 0} q)")
        ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
