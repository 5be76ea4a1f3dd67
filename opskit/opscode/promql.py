"""A small PromQL scanner: which series names does an expression read?

Not a parser: it removes what can never be a series name (string literals, label matchers,
range/subquery brackets, grouping clauses, function and aggregation calls, keywords, numbers and
durations) and returns the identifiers that are left. That is enough to check that every rule and
dashboard query names only catalogue series or recording rules opskit defines itself.
"""

from __future__ import annotations

import re

# Words that may stand alone in PromQL without being a series name.
KEYWORDS = frozenset({
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
    "offset", "bool", "inf", "nan", "atan2", "start", "end",
})

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_BRACES = re.compile(r"\{[^{}]*\}")
_BRACKETS = re.compile(r"\[[^\[\]]*\]")
# Grouping and matching clauses carry label names, never series names.
_CLAUSE = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", re.IGNORECASE)
# An identifier not glued to a preceding word character or digit (so `1e3`, `5m` are skipped).
_IDENT = re.compile(r"(?<![\w.])([A-Za-z_:][\w:]*)(\s*\()?")


def series_names(expr: str) -> set[str]:
    """The series (metric or recording-rule) names an expression selects."""
    text = _STRING.sub(" ", expr)
    text = _BRACES.sub(" ", text)
    text = _BRACKETS.sub(" ", text)
    text = _CLAUSE.sub(" ", text)
    names = set()
    for match in _IDENT.finditer(text):
        word, call = match.group(1), match.group(2)
        if call or word.lower() in KEYWORDS:
            continue
        names.add(word)
    return names
