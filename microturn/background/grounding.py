"""An ask's numbers, read against what the user said.

The interaction model writes its ask from what it heard: "4,817 times 23" becomes the query
`calculator: 4817 times 23`. A 135M model copies long numbers badly ("9,1333 multiplied by
636" for 91,333 × 636), and a tool that computes the garbled copy answers another question.
A background worker in the field gets the conversation with the request, so here the query's
numbers are checked against the numbers in the user's recent words: one the user never said,
but close to one they did (a digit dropped, doubled, swapped or changed, a comma misplaced),
is replaced by what they said. Numbers far from anything said are left alone.

An ask that no tool takes even then ("<ask> Can you help me figure out what I'm missing?
</ask>" for "Could you figure out 1,558 added to 694 for me?") goes to the tool that takes the
user's latest sentence, if one does: the request is about what they just asked.
"""

import re

from microturn.background.tools import Tools

NUMBER = re.compile(r"\d[\d,]*(?:\.\d+)?")
MAX_EDITS = 2  # and at most a third of the digits (one for short numbers): "17" is never "21"


def _digits(number: str) -> str:
    return number.replace(",", "")


def _edits(a: str, b: str) -> int:
    """Damerau-Levenshtein distance (adjacent swaps count once)."""
    rows = [list(range(len(b) + 1))]
    for i in range(1, len(a) + 1):
        row = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            row[j] = min(rows[-1][j] + 1, row[j - 1] + 1,
                         rows[-1][j - 1] + (a[i - 1] != b[j - 1]))
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                row[j] = min(row[j], rows[-2][j - 2] + 1)
        rows.append(row)
    return rows[-1][-1]


def ground_numbers(query: str, heard: str) -> str:
    """`query` with each number the user did not say replaced by the closest one they did."""
    said = {_digits(n) for n in NUMBER.findall(heard)}
    if not said:
        return query

    def nearest(match: re.Match) -> str:
        copied = _digits(match.group())
        if copied in said:
            return copied  # the user's digits, whatever commas the copy put in
        if len(copied) < 2:  # too short to tell a slip from another number
            return match.group()
        limit = min(MAX_EDITS, max(1, len(copied) // 3))
        best_edits, _, best = min((_edits(copied, s), -len(s), s) for s in said)
        return best if best_edits <= limit else match.group()

    return NUMBER.sub(nearest, query)


def ground(query: str, heard: str, tools: Tools) -> str:
    """The query a tool (or the background model) gets for an ask written after `heard`."""
    query = ground_numbers(query, heard)
    if tools.route(query)[0] is not None:
        return query
    for sentence in reversed(re.split(r"(?<=[.?!])\s+", heard.strip())):
        tool, _ = tools.route(sentence)
        if tool is not None:
            return f"{tool.name}: {sentence}"
    return query
