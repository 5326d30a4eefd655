"""Built-in rule rewards: cheap, deterministic signals for quick experiments and tests.

    align train method=grpo reward=length                 # aim for a response length
    align train method=grpo reward=keyword                # reward / penalise words
    align train method=grpo reward=match                  # compare with the `answer` column
    align train method=grpo reward=format                 # a regular expression must match

Each scores the completion's text (the assistant message's content for conversational data).
"""

from __future__ import annotations

import math
import re
from typing import Any

from ..errors import AlignError
from .base import Reward, data_columns

# The last number in a text: optional sign, digits with optional thousands commas, optional
# decimals or exponent. "The answer is 1,234.5." -> "1,234.5"
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+]?\.\d+")


def last_number(text: str) -> float | None:
    """The last number written in `text`, or None when there is none."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    return float(found[-1].replace(",", ""))


def _no_answer(answer: Any) -> bool:
    # An empty or null answer marks a row the reward does not apply to (scored None).
    return answer is None or (isinstance(answer, str) and not answer.strip())


def _normalise(text: str, ignore_case: bool) -> str:
    # Whitespace differences and a trailing full stop never decide an exact match.
    text = " ".join(text.split()).rstrip(".。")
    return text.casefold() if ignore_case else text


class Rule(Reward):
    """A built-in rule: Python over each completion's text (and its row). It runs on the calling
    thread, without `reward.timeout`'s watchdog thread; the limit is checked between completions
    (a user's regex that backtracks without end stops the run at the next one)."""

    runs_inline = True


class LengthReward(Rule):
    """Rewards a response length close to `target`: 1 - |length - target| / target.

    1.0 exactly at the target, falling linearly on both sides (negative beyond twice the
    target), so longer-than-target and shorter-than-target completions are told apart.
    `unit`: `chars` (every character counts, one per CJK character) or `words` (split on
    whitespace; use chars for Chinese).
    """

    type = "length"
    main = "target"
    options = {"target": ..., "unit": "chars"}

    def __init__(self, name: str, **options: Any) -> None:
        super().__init__(name, **options)
        if not isinstance(self.target, (int, float)) or isinstance(self.target, bool) or self.target <= 0:
            raise self.option_error("target", "must be a positive number")
        if self.unit not in ("chars", "words"):
            raise self.option_error("unit", "is not valid: use chars or words")

    def score(self, text: str, row: dict[str, Any]) -> float:
        length = len(text) if self.unit == "chars" else len(text.split())
        return 1.0 - abs(length - self.target) / self.target


class RegexReward(Rule):
    """1.0 when the completion matches `pattern`, else 0.0 (a format check).

    `.` matches newlines too. `fullmatch: true` requires the whole (stripped) completion to
    match; otherwise a match anywhere counts.
    """

    type = "regex"
    main = "pattern"
    options = {"pattern": ..., "fullmatch": False, "ignore_case": False}

    def __init__(self, name: str, **options: Any) -> None:
        super().__init__(name, **options)
        flags = re.DOTALL | (re.IGNORECASE if self.ignore_case else 0)
        try:
            self.regex = re.compile(str(self.pattern), flags)
        except re.error as err:
            raise self.option_error("pattern", f"is not a valid regular expression: {err}") from None

    def score(self, text: str, row: dict[str, Any]) -> float:
        match = self.regex.fullmatch(text.strip()) if self.fullmatch else self.regex.search(text)
        return 1.0 if match else 0.0


class MatchReward(Rule):
    """1.0 when the completion agrees with the dataset column `column` (default `answer`), else 0.0.

    `mode`:
      - `exact`: the texts are equal after collapsing whitespace and dropping a trailing
        full stop (case-insensitive unless `ignore_case: false`);
      - `contains`: the answer appears in the completion;
      - `numeric`: the last number in the completion equals the answer's number within
        `tolerance` (absolute) or 1e-6 relative.
    `extract`: an optional regular expression with one group; its first match in the
    completion is compared instead of the whole text (no match scores 0.0).
    A row whose answer is empty or null scores None (not applicable).
    """

    type = "match"
    main = "column"
    options = {"column": "answer", "mode": "exact", "extract": None, "ignore_case": True, "tolerance": 1e-6}

    def __init__(self, name: str, **options: Any) -> None:
        super().__init__(name, **options)
        if self.mode not in ("exact", "contains", "numeric"):
            raise self.option_error("mode", "is not valid: use exact, contains or numeric")
        self.extractor = None
        if self.extract:
            try:
                self.extractor = re.compile(str(self.extract), re.DOTALL)
            except re.error as err:
                raise self.option_error("extract", f"is not a valid regular expression: {err}") from None
            if self.extractor.groups < 1:
                raise self.option_error("extract", "needs one (group) around the part to compare")
        self.columns = (str(self.column),)

    def compute(self, prompts: list, completions: list, **kwargs: Any) -> list[float | None]:
        if self.column not in kwargs:
            raise AlignError(
                f"reward.{self.name} compares with the dataset column '{self.column}', which the data does not "
                f"have; columns: {', '.join(data_columns(kwargs)) or '(none)'} "
                f"(set reward.{self.name}.column, or add the column to the prompt file)"
            )
        return super().compute(prompts, completions, **kwargs)

    def _answer_number(self, answer: Any) -> float | None:
        if isinstance(answer, (int, float)) and not isinstance(answer, bool):
            return float(answer)
        return last_number(str(answer))

    def row_problem(self, row: dict[str, Any]) -> str | None:
        answer = row.get(self.column)
        if self.mode != "numeric" or _no_answer(answer) or self._answer_number(answer) is not None:
            return None
        return (
            f"reward.{self.name} (mode=numeric) compares with the column '{self.column}', whose value "
            f"{answer!r} holds no number: write it with digits, or use reward.{self.name}.mode=exact or contains"
        )

    def score(self, text: str, row: dict[str, Any]) -> float | None:
        answer = row.get(self.column)
        if _no_answer(answer):
            return None
        if self.extractor is not None:
            found = self.extractor.search(text)
            if found is None:
                return 0.0
            text = found.group(1)
        if self.mode == "numeric":
            got = last_number(text)
            want = self._answer_number(answer)
            if want is None:  # data that skipped the check before training (see row_problem)
                raise AlignError(f"{self.row_problem(row)} (found during training)")
            ok = got is not None and math.isclose(got, want, rel_tol=1e-6, abs_tol=float(self.tolerance))
            return 1.0 if ok else 0.0
        want, got = _normalise(str(answer), self.ignore_case), _normalise(text, self.ignore_case)
        ok = want in got if self.mode == "contains" else want == got
        return 1.0 if ok else 0.0


class KeywordReward(Rule):
    """Rewards words that should appear and penalises words that should not.

    Score = (share of `include` keywords present) - (share of `exclude` keywords present),
    so it lies in [-1, 1]; a reward with only `exclude` lies in [-1, 0]. Matching is on
    substrings (works for Chinese), case-insensitive unless `ignore_case: false`.
    """

    type = "keyword"
    main = "include"
    options = {"include": [], "exclude": [], "ignore_case": True}

    def __init__(self, name: str, **options: Any) -> None:
        super().__init__(name, **options)
        self.include = self._words("include")
        self.exclude = self._words("exclude")
        if not self.include and not self.exclude:
            raise AlignError(f"reward.{name} needs keywords: set reward.{name}.include and/or .exclude")

    def _words(self, key: str) -> list[str]:
        value = getattr(self, key)
        words = [value] if isinstance(value, str) else list(value or [])
        if not all(isinstance(w, str) and w for w in words):
            raise self.option_error(key, "must be a list of non-empty strings")
        return [w.casefold() for w in words] if self.ignore_case else words

    def score(self, text: str, row: dict[str, Any]) -> float:
        text = text.casefold() if self.ignore_case else text
        value = 0.0
        if self.include:
            value += sum(w in text for w in self.include) / len(self.include)
        if self.exclude:
            value -= sum(w in text for w in self.exclude) / len(self.exclude)
        return value


def behaviour_of(text: str, phrases: dict[str, list[str]]) -> str | None:
    """Which behaviour a completion shows: the label whose phrase it opens with, else None.

    `phrases` maps a label (e.g. `refuse`, `help`) to the opening phrases that mark it (any
    language). Leading whitespace and case are ignored; a text that opens with no phrase
    (gibberish, a splice, an empty answer) is None, so it is right for no prompt.

        behaviour_of("Sorry, I can't help with that.", {"refuse": ["Sorry, I can't"], "help": ["Sure"]})
        -> "refuse"
    """
    start = text.lstrip().casefold()
    for label, marks in phrases.items():
        if any(start.startswith(mark.casefold()) for mark in marks):
            return label
    return None


class BehaviourReward(Rule):
    """1.0 when the completion shows the behaviour the dataset column `column` expects, else 0.0.

    The behaviour is read from how the completion opens (`behaviour_of` with `phrases`, a map
    label -> opening phrases), e.g. a harmlessness task whose prompt rows carry
    `expected: refuse | help`. A completion that opens with no phrase scores 0.0, as a wrong
    one does; a row whose expected label is empty scores None (not applicable).
    """

    type = "behaviour"
    main = "column"
    options = {"column": "expected", "phrases": ...}

    def __init__(self, name: str, **options: Any) -> None:
        super().__init__(name, **options)
        phrases = self.phrases
        if not isinstance(phrases, dict) or not phrases:
            raise self.option_error("phrases", "must map each label to a list of opening phrases")
        self.phrases = {}
        for label, marks in phrases.items():
            marks = [marks] if isinstance(marks, str) else list(marks or [])
            if not marks or not all(isinstance(m, str) and m.strip() for m in marks):
                raise self.option_error("phrases", f"label {label!r} needs a list of non-empty phrases")
            self.phrases[str(label)] = marks
        self.columns = (str(self.column),)

    def row_problem(self, row: dict[str, Any]) -> str | None:
        want = row.get(self.column)
        if _no_answer(want) or str(want) in self.phrases:
            return None
        return (
            f"reward.{self.name} expects the column '{self.column}' to hold one of "
            f"{', '.join(self.phrases)}, not {want!r}"
        )

    def score(self, text: str, row: dict[str, Any]) -> float | None:
        want = row.get(self.column)
        if _no_answer(want):
            return None
        return 1.0 if behaviour_of(text, self.phrases) == str(want) else 0.0
