"""Multiple-choice benchmarks read from their public file formats, prompted as lm-evaluation-harness does.

Each reader turns one file into `MCItem`s: the contexts and continuations to score, the gold index and
the choice strings whose character length normalises `acc_norm`. Prompts, target delimiters and
few-shot layout copy the harness's task configs (hellaswag, arc_easy/challenge, winogrande, piqa,
boolq, openbookqa, mmlu), so accuracies are comparable with published numbers.

Formats accepted (JSON Lines unless said):
  hellaswag   rowanz/hellaswag `hellaswag_val.jsonl` (ctx_a, ctx_b, activity_label, endings, label)
  arc_*       allenai ARC `ARC-*-Test.jsonl` ({question: {stem, choices: [{text, label}]}, answerKey})
              or the Hugging Face layout ({question, choices: {text, label}, answerKey})
  winogrande  `dev.jsonl` (sentence with one "_", option1, option2, answer "1"/"2")
  piqa        `valid.jsonl` (goal, sol1, sol2) with `valid-labels.lst` beside it, or a `label` field
  boolq       `dev.jsonl` (question, passage, answer true/false) or SuperGLUE (label 0/1)
  openbookqa  `test.jsonl` ({question: {stem, choices}, answerKey}) or HF (question_stem, choices)
  mmlu        the original CSVs (question, A, B, C, D, answer letter; no header): one `*_test.csv`
              file or a directory `test/` (+ `dev/` for few-shot); or HF JSONL (question, subject, choices, answer)
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

from tinyllama.data.readers import read_jsonl_objects
from tinyllama.errors import TinyLlamaError


@dataclass
class MCItem:
    contexts: list[str]  # one per choice (the same string repeated unless the task varies the context)
    continuations: list[str]
    choices: list[str]  # what acc_norm's character length is measured on (the harness's doc_to_choice)
    gold: int
    meta: dict = field(default_factory=dict)


# ---- file reading ---------------------------------------------------------------------------------
def read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    return read_jsonl_objects(path, "task file")


def _need(doc: dict, key: str, where: str):
    if key not in doc:
        raise TinyLlamaError(f"{where}: missing field '{key}'")
    return doc[key]


def _choices_from(doc: dict, where: str, question_key: str) -> tuple[str, list[str], list[str]]:
    """ARC/OpenBookQA: (question text, choice texts, choice labels) from either the original or HF layout."""
    q = _need(doc, question_key if question_key in doc else "question", where)
    if isinstance(q, dict):  # original AllenAI layout
        stem = _need(q, "stem", where + " field 'question'")
        ch = _need(q, "choices", where + " field 'question'")
        return stem, [c["text"] for c in ch], [c["label"] for c in ch]
    ch = _need(doc, "choices", where)
    if not isinstance(ch, dict) or "text" not in ch or "label" not in ch:
        raise TinyLlamaError(f"{where}: field 'choices' must be {{'text': [...], 'label': [...]}}")
    return q, list(ch["text"]), list(ch["label"])


def _gold_from_key(labels: list[str], key: str, where: str) -> int:
    key = str(key).lstrip()
    if key not in labels:
        raise TinyLlamaError(f"{where}: answerKey {key!r} is not one of the choice labels {labels}")
    return labels.index(key)


def _mc(context: str, choices: list[str], gold: int, delim: str = " ", **meta) -> MCItem:
    return MCItem([context] * len(choices), [delim + c for c in choices], list(choices), gold, meta)


# ---- tasks ----------------------------------------------------------------------------------------
def _hellaswag_pre(text: str) -> str:
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def load_hellaswag(path: Path, **_) -> list[MCItem]:
    items = []
    for n, doc in read_jsonl(path):
        w = f"{path}:{n}"
        ctx = _need(doc, "ctx_a", w) + " " + _need(doc, "ctx_b", w).capitalize()
        query = _hellaswag_pre(_need(doc, "activity_label", w) + ": " + ctx)
        endings = [_hellaswag_pre(e) for e in _need(doc, "endings", w)]
        label = _need(doc, "label", w)
        if label in ("", None):
            raise TinyLlamaError(f"{w}: field 'label' is empty (the test split has no labels; use the validation file)")
        items.append(_mc(query, endings, int(label)))
    return items


def load_arc(path: Path, **_) -> list[MCItem]:
    items = []
    for n, doc in read_jsonl(path):
        w = f"{path}:{n}"
        q, texts, labels = _choices_from(doc, w, "question")
        gold = _gold_from_key(labels, _need(doc, "answerKey", w), w)
        items.append(_mc(f"Question: {q}\nAnswer:", texts, gold))
    return items


def load_openbookqa(path: Path, **_) -> list[MCItem]:
    items = []
    for n, doc in read_jsonl(path):
        w = f"{path}:{n}"
        q, texts, labels = _choices_from(doc, w, "question_stem")
        gold = _gold_from_key(labels, _need(doc, "answerKey", w), w)
        items.append(_mc(q, texts, gold))
    return items


def load_winogrande(path: Path, **_) -> list[MCItem]:
    items = []
    for n, doc in read_jsonl(path):
        w = f"{path}:{n}"
        sentence = _need(doc, "sentence", w)
        if "_" not in sentence:
            raise TinyLlamaError(f"{w}: field 'sentence' has no '_' blank to fill")
        answer = str(_need(doc, "answer", w))
        if answer not in ("1", "2"):
            raise TinyLlamaError(f"{w}: field 'answer' must be \"1\" or \"2\", got {answer!r}")
        i = sentence.index("_")
        # The option is part of the context; the scored continuation is the rest of the sentence.
        contexts = [sentence[:i] + _need(doc, "option1", w), sentence[:i] + _need(doc, "option2", w)]
        rest = " " + sentence[i + 1:].strip()
        items.append(MCItem(contexts, [rest, rest], contexts, int(answer) - 1))
    return items


def load_piqa(path: Path, **_) -> list[MCItem]:
    labels_file = path.with_name(path.stem + "-labels.lst")
    labels = labels_file.read_text().split() if labels_file.is_file() else None
    items = []
    for k, (n, doc) in enumerate(read_jsonl(path)):
        w = f"{path}:{n}"
        if "label" in doc:
            label = doc["label"]
        elif labels is not None:
            if k >= len(labels):
                raise TinyLlamaError(f"{labels_file}: has {len(labels)} labels but {path} has more items")
            label = labels[k]
        else:
            raise TinyLlamaError(f"{w}: missing field 'label' and no {labels_file.name} beside the file")
        items.append(_mc(f"Question: {_need(doc, 'goal', w)}\nAnswer:", [_need(doc, "sol1", w), _need(doc, "sol2", w)],
                         int(label)))
    return items


def load_boolq(path: Path, **_) -> list[MCItem]:
    items = []
    for n, doc in read_jsonl(path):
        w = f"{path}:{n}"
        if "label" in doc:
            gold = int(doc["label"])
        else:
            ans = _need(doc, "answer", w)
            if not isinstance(ans, bool):
                raise TinyLlamaError(f"{w}: field 'answer' must be true or false, got {ans!r}")
            gold = int(ans)
        ctx = f"{_need(doc, 'passage', w)}\nQuestion: {_need(doc, 'question', w)}?\nAnswer:"
        items.append(_mc(ctx, ["no", "yes"], gold))
    return items


MMLU_LETTERS = ["A", "B", "C", "D"]


def _mmlu_docs(path: Path, subject: Optional[str] = None) -> list[dict]:
    """Rows {question, choices, answer (int), subject} from an original CSV or an HF-layout JSONL."""
    docs = []
    if path.suffix == ".csv":
        subj = subject or re.sub(r"_(test|dev|val)$", "", path.stem)
        with open(path, newline="", encoding="utf-8") as f:
            for n, row in enumerate(csv.reader(f), 1):
                if len(row) != 6:
                    raise TinyLlamaError(f"{path}:{n}: expected 6 columns (question, A, B, C, D, answer), got {len(row)}")
                if row[5].strip() not in MMLU_LETTERS:
                    raise TinyLlamaError(f"{path}:{n}: answer must be one of A, B, C, D, got {row[5]!r}")
                docs.append({"question": row[0], "choices": row[1:5], "answer": MMLU_LETTERS.index(row[5].strip()),
                             "subject": subj})
    else:
        for n, doc in read_jsonl(path):
            w = f"{path}:{n}"
            ans = _need(doc, "answer", w)
            ans = MMLU_LETTERS.index(ans) if isinstance(ans, str) and ans in MMLU_LETTERS else int(ans)
            docs.append({"question": _need(doc, "question", w), "choices": list(_need(doc, "choices", w)),
                         "answer": ans, "subject": subject or doc.get("subject") or path.stem})
    return docs


def _mmlu_prompt(doc: dict) -> str:
    c = doc["choices"]
    return f"{doc['question'].strip()}\nA. {c[0]}\nB. {c[1]}\nC. {c[2]}\nD. {c[3]}\nAnswer:"


def load_mmlu(path: Path, num_fewshot: int = 0, fewshot_path: Optional[Path] = None, **_) -> list[MCItem]:
    """Zero- or k-shot MMLU; few-shot examples are the first k dev rows of the same subject (harness: first_n)."""
    if path.is_dir():
        test_dir = path / "test" if (path / "test").is_dir() else path
        files = sorted(test_dir.glob("*_test.csv")) or sorted(test_dir.glob("*.csv"))
        if not files:
            raise TinyLlamaError(f"{path}: no *_test.csv files (expected the MMLU data/ or data/test/ directory)")
        dev_dir = fewshot_path or (path / "dev" if (path / "dev").is_dir() else None)
        items = []
        for f in files:
            subject = re.sub(r"_test$", "", f.stem)
            dev = dev_dir / f"{subject}_dev.csv" if dev_dir is not None else None
            items += load_mmlu(f, num_fewshot=num_fewshot, fewshot_path=dev)
        return items
    if not path.is_file():
        raise TinyLlamaError(f"{path}: task file not found")
    docs = _mmlu_docs(path)
    if num_fewshot > 0 and fewshot_path is None:
        guess = path.with_name(path.name.replace("_test", "_dev"))
        guess2 = path.parent.parent / "dev" / guess.name
        fewshot_path = guess if guess != path and guess.is_file() else guess2 if guess2.is_file() else None
        if fewshot_path is None:
            raise TinyLlamaError(f"{path}: {num_fewshot}-shot MMLU needs the subject's dev file (pass --fewshot-file)")
    by_subject: dict[str, list[dict]] = {}
    if num_fewshot > 0:
        if not Path(fewshot_path).is_file():
            raise TinyLlamaError(f"{fewshot_path}: few-shot (dev) file not found")
        for d in _mmlu_docs(Path(fewshot_path)):
            by_subject.setdefault(d["subject"], []).append(d)
    items = []
    for d in docs:
        subject = d["subject"]
        text = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
        if num_fewshot > 0:
            shots = by_subject.get(subject) or next(iter(by_subject.values()), [])
            if len(shots) < num_fewshot:
                raise TinyLlamaError(f"{fewshot_path}: needs {num_fewshot} dev rows for '{subject}', has {len(shots)}")
            for s in shots[:num_fewshot]:
                text += _mmlu_prompt(s) + " " + MMLU_LETTERS[s["answer"]] + "\n\n"
        text += _mmlu_prompt(d)
        items.append(_mc(text, MMLU_LETTERS, d["answer"], subject=subject))
    return items


TASKS: dict[str, Callable[..., list[MCItem]]] = {
    "hellaswag": load_hellaswag,
    "arc_easy": load_arc,
    "arc_challenge": load_arc,
    "winogrande": load_winogrande,
    "piqa": load_piqa,
    "boolq": load_boolq,
    "openbookqa": load_openbookqa,
    "mmlu": load_mmlu,
}


def load_task(name: str, path, **kwargs) -> list[MCItem]:
    if name not in TASKS:
        raise TinyLlamaError(f"unknown task '{name}'; choose one of: {', '.join(TASKS)}")
    items = TASKS[name](Path(path), **kwargs)
    if not items:
        raise TinyLlamaError(f"{path}: no items found for task '{name}'")
    for it in items:
        if not 0 <= it.gold < len(it.choices):
            raise TinyLlamaError(f"{path}: gold answer index {it.gold} out of range for {len(it.choices)} choices")
    return items


# ---- scoring --------------------------------------------------------------------------------------
def mean_stderr(values: list[float]) -> float:
    """Standard error of the mean with the sample (n-1) standard deviation, as the harness reports."""
    n = len(values)
    if n < 2:
        return float("nan")
    mu = sum(values) / n
    return math.sqrt(sum((v - mu) ** 2 for v in values) / (n - 1)) / math.sqrt(n)


def _argmax(xs: list[float]) -> int:
    best = 0
    for i, x in enumerate(xs):
        if x > xs[best]:
            best = i  # first maximum wins, like numpy.argmax
    return best


def score_items(items: list[MCItem], lls: list[float]) -> dict:
    """Per-item log-likelihoods (flattened in item/choice order) -> acc, acc_norm and their standard errors."""
    acc, acc_norm, k = [], [], 0
    for it in items:
        ll = lls[k: k + len(it.choices)]
        k += len(it.choices)
        acc.append(1.0 if _argmax(ll) == it.gold else 0.0)
        norm = [x / float(len(c)) for x, c in zip(ll, it.choices)]
        acc_norm.append(1.0 if _argmax(norm) == it.gold else 0.0)
    n = len(items)
    return {"n": n, "acc": sum(acc) / n, "acc_stderr": mean_stderr(acc), "acc_norm": sum(acc_norm) / n,
            "acc_norm_stderr": mean_stderr(acc_norm), "per_item": {"acc": acc, "acc_norm": acc_norm}}


def evaluate_task(scorer, items: list[MCItem]) -> dict:
    pairs = [(c, x) for it in items for c, x in zip(it.contexts, it.continuations)]
    lls = [ll for ll, _ in scorer.loglikelihood(pairs)]
    out = score_items(items, lls)
    out["loglikelihoods"] = lls
    return out
