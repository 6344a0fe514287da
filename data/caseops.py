"""CaseOps: a lossless, bijective transform that moves the case of ASCII letters into four operators.

Capitals cost a BPE tokenizer a second copy of every word ("the", "The", "THE"); after this transform
the letters are always lowercase and the case is spelt by operator characters (Unicode private use,
FRONTIER.md §6), which the tokenizer keeps as single, never-merged pieces. Rules, per maximal run
of ASCII letters:

    lowercase word               -> unchanged                       "word"  -> "word"
    Title word (one capital too) -> TITLE + lowercase                "Word"  -> "\\ue001word", "A" -> "\\ue001a"
    ALLCAPS word, 2+ letters     -> ALLCAPS + lowercase              "WORD"  -> "\\ue002word"
    any other mix                -> [TITLE if the first letter is a capital] first letter lowercase,
                                    then CAPNEXT before each later capital   "McDo" -> "\\ue001mc\\ue003do"
    a literal operator character -> ESCAPE + that character         "\\ue001" -> "\\ue004\\ue001"

Everything else (digits, punctuation, whitespace, non-ASCII letters) is left alone. decode() is a
strict parser: it accepts exactly the strings encode() can produce (so encode is a bijection onto
them) and raises CaseOpsError, naming the position, for anything else.
"""
from __future__ import annotations

import re

TITLE, ALLCAPS, CAPNEXT, ESCAPE = "\ue001", "\ue002", "\ue003", "\ue004"
OPERATORS = (TITLE, ALLCAPS, CAPNEXT, ESCAPE)

# Only runs holding a capital (and operator characters) need work; lowercase runs are matched by
# neither branch, so they cost no Python call. The look-behind pins a match to the first letter of
# its run (it also fails fast inside lowercase runs); [A-Za-z]* then takes the rest of the run.
_ENCODE = re.compile(r"(?<![A-Za-z])[a-z]*[A-Z][A-Za-z]*|[\ue001-\ue004]")
# One encoded unit: an escaped literal, a word with its optional word operator and CAPNEXT marks,
# or an operator/capital that is valid nowhere else (an error). Text between units is copied.
_DECODE = re.compile(r"\ue004(?P<literal>[\ue001-\ue004])|(?P<op>[\ue001\ue002]?)(?P<word>[a-z](?:\ue003?[a-z])*)"
                     r"|(?P<bad>[\ue001-\ue004A-Z])")
_CAPNEXT_LETTER = re.compile("\ue003([a-z])")


class CaseOpsError(ValueError):
    """A string that encode() cannot have produced."""


def _encode_unit(match: re.Match) -> str:
    unit = match.group()
    if unit in OPERATORS:
        return ESCAPE + unit
    lower = unit.lower()
    if len(unit) >= 2 and unit.isupper():
        return ALLCAPS + lower
    if unit[1:].islower() or len(unit) == 1:  # Title (the run holds a capital, so it is the first letter)
        return TITLE + lower
    marked = "".join(CAPNEXT + c.lower() if c.isupper() else c for c in unit[1:])
    return (TITLE if unit[0].isupper() else "") + lower[0] + marked


def encode(text: str) -> str:
    """The CaseOps form of text (see the module docstring)."""
    return _ENCODE.sub(_encode_unit, text)


def decode(text: str) -> str:
    """The text whose CaseOps form is `text`; CaseOpsError if encode() never produces `text`."""
    out, copied_to, word_end = [], 0, -1
    for m in _DECODE.finditer(text):
        out.append(text[copied_to:m.start()])
        copied_to = m.end()
        if m["literal"]:
            out.append(m["literal"])
        elif m["word"]:
            op, letters = m["op"], m["word"]
            if op and m.start() == word_end:  # glued to the previous word: one run, so CAPNEXT was due
                raise CaseOpsError(f"position {m.start()}: word operator {op!r} inside a word; expected CAPNEXT")
            word_end = m.end()
            capitals = letters.count(CAPNEXT)
            plain = letters.replace(CAPNEXT, "")
            if op == ALLCAPS:
                if capitals or len(plain) < 2:
                    raise CaseOpsError(f"position {m.start()}: ALLCAPS must be followed by 2+ lowercase letters "
                                       f"without CAPNEXT, got {letters!r}")
                out.append(plain.upper())
                continue
            if op == TITLE and capitals == len(plain) - 1 and len(plain) >= 2:
                raise CaseOpsError(f"position {m.start()}: an all-capital word is spelt ALLCAPS, not TITLE+CAPNEXT")
            word = _CAPNEXT_LETTER.sub(lambda c: c[1].upper(), letters)
            out.append(word[0].upper() + word[1:] if op == TITLE else word)
        else:
            bad = m["bad"]
            what = {ESCAPE: "ESCAPE not followed by an operator character", CAPNEXT: "CAPNEXT not between two letters of a word",
                    TITLE: "TITLE not followed by a lowercase letter", ALLCAPS: "ALLCAPS not followed by a lowercase letter"}
            raise CaseOpsError(f"position {m.start()}: {what.get(bad, f'capital {bad!r} (capitals are spelt with operators)')}")
    out.append(text[copied_to:])
    return "".join(out)
