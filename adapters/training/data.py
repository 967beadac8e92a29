"""Training data: JSONL files parsed and checked up front, so a bad line fails before a
model is loaded and the error names the file, the line and what is wrong with it.

One JSON object per line (blank lines are skipped):

| task | keys |
|---|---|
| sequence-classification | `text` (str), `label` (str or int) |
| causal-lm | `text` (str) |
| feature-extraction | `anchor` (str), `positive` (str) |
| question-answering | `question` (str), `context` (str), `answers`: `{"text": [str], "answer_start": [int]}` (SQuAD) |
| image-classification | `image` (str: a file path), `label` (str or int) |

Extra keys are allowed (datasets often carry ids); missing or mistyped ones are not.

Question answering: every answer must be the context's own text at `answer_start`
(`context[start:start + len(text)] == text`, as in SQuAD), and there must be at least one:
the served decode always answers with a span of the context, so SQuAD 2.0's unanswerable
questions (empty lists) cannot be learned for it and are refused. Training uses the first
answer; evaluation scores against all of them.

Images: a relative `image` path is relative to the folder of the JSONL file (so a data set
folder can move as a whole); an absolute one is used as is. The file must exist when the
JSONL is read; it is decoded (PNG or JPEG, as the server accepts) when its batch is built.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from adapters.bundle import CLASSIFICATION_TASKS, Task

#: Keys each task needs, all strings except `label` and `answers`.
REQUIRED_KEYS: dict[Task, tuple[str, ...]] = {
    Task.SEQUENCE_CLASSIFICATION: ("text", "label"),
    Task.CAUSAL_LM: ("text",),
    Task.FEATURE_EXTRACTION: ("anchor", "positive"),
    Task.QUESTION_ANSWERING: ("question", "context", "answers"),
    Task.IMAGE_CLASSIFICATION: ("image", "label"),
}
#: Stop collecting after this many bad lines; the first ones are what a user fixes first.
MAX_REPORTED = 20


class TrainingDataError(ValueError):
    """A training or eval file cannot be used; carries every problem found (up to a cap)."""

    def __init__(self, problems: list[str] | str) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


@dataclass
class Example:
    """One parsed line; which fields are set depends on the task."""

    line: int
    text: str | None = None
    label: str | int | None = None
    anchor: str | None = None
    positive: str | None = None
    question: str | None = None
    context: str | None = None
    #: question-answering: (text, character start in the context) of each gold answer
    answers: list[tuple[str, int]] | None = None
    #: image-classification: the image file, resolved against the JSONL's folder
    image: Path | None = None


@dataclass
class Dataset:
    """The parsed examples of one file, with their task and (for classification) labels."""

    path: Path
    task: Task
    examples: list[Example] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.examples)

    def raw_labels(self) -> list[str | int]:
        return [e.label for e in self.examples if e.label is not None]


def _check_answers(value: object, context: str) -> tuple[list[tuple[str, int]] | None, str | None]:
    """SQuAD's `answers` object checked against its context: (text, start) pairs or why not."""
    if not isinstance(value, dict) or not {"text", "answer_start"} <= value.keys():
        return None, "'answers' must be an object with lists 'text' and 'answer_start' (SQuAD format)"
    texts, starts = value["text"], value["answer_start"]
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        return None, "'answers.text' must be a list of strings"
    if not isinstance(starts, list) or not all(isinstance(a, int) and not isinstance(a, bool) for a in starts):
        return None, "'answers.answer_start' must be a list of integers"
    if len(texts) != len(starts):
        return None, f"'answers' has {len(texts)} texts but {len(starts)} starts"
    if not texts:
        return None, (
            "'answers' is empty: every question needs an answer in its context "
            "(unanswerable questions are not supported)"
        )
    for text, start in zip(texts, starts):
        if not text.strip():
            return None, "an answer text is empty"
        if context[start : start + len(text)] != text or start < 0:
            found = context[max(start, 0) : max(start, 0) + len(text)]
            return None, f"answer {text!r} is not the context's text at answer_start {start} (found {found!r})"
    return list(zip(texts, starts)), None


def _check_line(obj: object, task: Task, folder: Path) -> tuple[Example | None, str | None]:
    if not isinstance(obj, dict):
        return None, f"expected a JSON object, got {type(obj).__name__}"
    missing = [k for k in REQUIRED_KEYS[task] if k not in obj]
    if missing:
        return None, f"missing key{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))} for task {task.value}"
    ex = Example(line=0)
    for key in REQUIRED_KEYS[task]:
        value = obj[key]
        if key == "label":
            if isinstance(value, bool) or not isinstance(value, (str, int)):
                return None, f"'label' must be a string or an integer, got {type(value).__name__} {value!r}"
            if isinstance(value, str) and not value.strip():
                return None, "'label' must not be empty"
        elif key == "answers":
            continue  # needs the context: checked below
        else:
            if not isinstance(value, str):
                return None, f"{key!r} must be a string, got {type(value).__name__}"
            if not value.strip():
                return None, f"{key!r} must not be empty"
        setattr(ex, key, value)
    if task is Task.QUESTION_ANSWERING:
        ex.answers, why = _check_answers(obj["answers"], obj["context"])
        if why is not None:
            return None, why
    if task is Task.IMAGE_CLASSIFICATION:
        ex.image = folder / obj["image"]  # an absolute path replaces the folder
        if not ex.image.is_file():
            return None, f"image {obj['image']!r} not found (looked for {ex.image})"
    return ex, None


def read_jsonl(path: str | os.PathLike[str], task: Task) -> Dataset:
    """Parse and check `path` for `task`; raises TrainingDataError naming every bad line."""
    path = Path(path)
    if not path.is_file():
        raise TrainingDataError(f"{path}: no such file")
    ds = Dataset(path=path, task=task)
    problems: list[str] = []
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                problems.append(f"{path}:{lineno}: not valid UTF-8 ({exc.reason} at byte {exc.start})")
                continue
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                problems.append(f"{path}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno})")
                continue
            ex, why = _check_line(obj, task, path.parent)
            if why is not None:
                problems.append(f"{path}:{lineno}: {why}")
            else:
                assert ex is not None
                ex.line = lineno
                ds.examples.append(ex)
            if len(problems) >= MAX_REPORTED:
                problems.append(f"{path}: stopped after {MAX_REPORTED} bad lines")
                break
    if problems:
        raise TrainingDataError(problems)
    if not ds.examples:
        raise TrainingDataError(f"{path}: no examples (the file is empty or only blank lines)")
    if task in CLASSIFICATION_TASKS:
        kinds = {type(label) for label in ds.raw_labels()}
        if len(kinds) > 1:
            first = {k: next(e for e in ds.examples if type(e.label) is k) for k in kinds}
            where = ", ".join(f"{k.__name__} on line {e.line}" for k, e in sorted(first.items(), key=lambda kv: kv[1].line))
            raise TrainingDataError(f"{path}: labels mix strings and integers ({where}); use one kind")
    return ds


def label_names(train: Dataset) -> list[str]:
    """Label names in index order: integers sorted numerically, strings sorted.

    Sorting (rather than first appearance) makes the index of a label independent of
    how the file happens to be shuffled. At least two labels are needed to classify.
    """
    raw = sorted(set(train.raw_labels()))  # one kind only, checked by read_jsonl
    if len(raw) < 2:
        raise TrainingDataError(f"{train.path}: {train.task.value} needs at least 2 labels, found {raw!r}")
    return [str(x) for x in raw]


def label_ids(ds: Dataset, names: list[str]) -> list[int]:
    """Index of each example's label in `names`; an unseen label is an error naming its line."""
    index = {n: i for i, n in enumerate(names)}
    ids: list[int] = []
    unknown: list[str] = []
    for e in ds.examples:
        i = index.get(str(e.label))
        if i is None:
            unknown.append(f"{ds.path}:{e.line}: label {e.label!r} is not among the training labels {names}")
        else:
            ids.append(i)
    if unknown:
        raise TrainingDataError(unknown[:MAX_REPORTED])
    return ids
