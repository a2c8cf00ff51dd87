"""CaseOps: a reversible lowercasing of ASCII letters with private-use operators for case (PR #1729,
used by #1855), and the original UTF-8 bytes each token of the transformed text stands for.

Over maximal runs of ASCII letters: a lowercase word stays; an all-caps word of two or more letters
becomes ALLCAPS + lowercase; a title-case word TITLE + lowercase; any other word is lowercased with
TITLE before an uppercase first letter and CAPNEXT before every later uppercase letter. ESC comes
before every literal operator character, so `decode(encode(s)) == s` for any string. This is the
record's `lossless_caps_caseops_v1` with one addition: ESC also comes before a literal U+2581,
SentencePiece's whitespace mark, which its decoder would turn into a space; `decode` reads ESC
followed by either U+2581 or a space as U+2581. Text without U+2581 transforms as in the record.

The tokenizer holds the four operators as user-defined pieces, so each is one token of its own.
BPB is counted against the original text: an operator token stands for no byte, an escaped
literal for its own UTF-8 length, any other token for the UTF-8 bytes of its text (the case of an
ASCII letter does not change its length).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import sentencepiece as spm

from pgolf.errors import PgolfError

TITLE, ALLCAPS, CAPNEXT, ESC = "\ue001", "\ue002", "\ue003", "\ue004"
OPERATORS = (TITLE, ALLCAPS, CAPNEXT, ESC)
SP_SPACE = "\u2581"
NAME = "caseops_v1"

# Any run of ASCII letters holding an uppercase one (lowercase-only words are left as they are),
# and every character that needs an escape.
_TO_ENCODE = re.compile(f"(?<![A-Za-z])[a-z]*[A-Z][A-Za-z]*|[{''.join(OPERATORS)}{SP_SPACE}]")
# The encoded text as a sequence of: an escape, a word (with its operators), a run of anything else.
_ENCODED = re.compile(
    f"{ESC}(?P<lit>[\\s\\S])"
    f"|(?P<mode>[{TITLE}{ALLCAPS}]?)(?P<word>[a-z](?:{CAPNEXT}?[a-z])*)"
    f"|(?P<plain>[^a-zA-Z{''.join(OPERATORS)}]+)"
)


class CaseOpsError(PgolfError):
    """Text that is not the output of `encode`."""


def _encode_match(m: re.Match) -> str:
    word = m.group()
    if len(word) == 1 and not word.isalpha():
        return ESC + word
    if len(word) >= 2 and word.isupper():
        return ALLCAPS + word.lower()
    if word[0].isupper() and word[1:].islower():
        return TITLE + word.lower()
    head = (TITLE if word[0].isupper() else "") + word[0].lower()
    return head + "".join(CAPNEXT + c.lower() if c.isupper() else c for c in word[1:])


def encode(text: str) -> str:
    """The CaseOps form of `text`: ASCII letters lowercased, case carried by operators."""
    return _TO_ENCODE.sub(_encode_match, text)


def _decode_word(mode: str, word: str, at: int) -> str:
    if mode == ALLCAPS:
        if CAPNEXT in word:
            raise CaseOpsError(f"CaseOps text: CAPNEXT inside an ALLCAPS word at character {at}")
        return word.upper()
    parts = word.split(CAPNEXT)
    out = [parts[0][0].upper() + parts[0][1:] if mode == TITLE else parts[0]]
    out += [p[0].upper() + p[1:] for p in parts[1:]]
    return "".join(out)


def decode(text: str) -> str:
    """The original of a CaseOps text; a malformed one (a dangling or misplaced operator, an
    uppercase ASCII letter, which `encode` never writes) raises CaseOpsError naming the position."""
    out, pos, last_word_end = [], 0, -1
    while pos < len(text):
        m = _ENCODED.match(text, pos)
        if m is None:
            raise CaseOpsError(f"CaseOps text: {text[pos]!r} at character {pos} cannot start a word, "
                               "an escape or plain text (a dangling or misplaced operator)")
        if m.group("lit") is not None:
            lit = m.group("lit")
            if lit not in OPERATORS and lit not in (SP_SPACE, " "):
                raise CaseOpsError(f"CaseOps text: ESC before {lit!r} at character {pos}; only an "
                                   "operator or U+2581 is escaped")
            out.append(SP_SPACE if lit == " " else lit)
        elif m.group("word") is not None:
            if m.group("mode") and last_word_end == pos:
                raise CaseOpsError(f"CaseOps text: a word operator inside a word at character {pos}")
            out.append(_decode_word(m.group("mode"), m.group("word"), pos))
            last_word_end = m.end()
        else:
            out.append(m.group("plain"))
        pos = m.end()
    return "".join(out)


@dataclass(frozen=True)
class ByteTable:
    """What each token id of a CaseOps tokenizer stands for in the original text."""

    base: np.ndarray  # int64 (V,): UTF-8 bytes of the piece's text ("▁" a space); operators, controls 0
    is_operator: np.ndarray  # bool (V,)
    leading_space: np.ndarray  # bool (V,): the piece starts with "▁" (an escaped U+2581 is 3 bytes, not 1)
    esc: int


def has_operators(sp: spm.SentencePieceProcessor) -> bool:
    """Whether a tokenizer holds the four CaseOps operators as pieces of their own: a CaseOps
    tokenizer, whatever a manifest or config says (plain text never trains these private-use pieces)."""
    return all(sp.id_to_piece(sp.piece_to_id(op)) == op for op in OPERATORS)


def byte_table(sp: spm.SentencePieceProcessor, name: str = "tokenizer") -> ByteTable:
    """The byte table of a CaseOps tokenizer; one without the operators as pieces of their own is refused."""
    ids = [sp.piece_to_id(op) for op in OPERATORS]
    if not has_operators(sp):
        raise CaseOpsError(f"{name}: the CaseOps operators U+E001..U+E004 are not pieces of their own; "
                           "it was not trained with tokenizer.caseops")
    n = sp.get_piece_size()
    base = np.zeros(n, dtype=np.int64)
    space = np.zeros(n, dtype=bool)
    for t in range(n):
        if sp.is_control(t) or sp.is_unknown(t) or sp.is_unused(t):
            continue
        piece = sp.id_to_piece(t)
        base[t] = 1 if sp.is_byte(t) else len(piece.replace(SP_SPACE, " ").encode())
        space[t] = not sp.is_byte(t) and piece.startswith(SP_SPACE)
    is_op = np.zeros(n, dtype=bool)
    is_op[ids] = True
    base[ids] = 0
    return ByteTable(base, is_op, space, ids[3])


def escaped(is_esc: np.ndarray) -> np.ndarray:
    """Positions whose token an ESC escapes: in a run of ESC tokens the 1st, 3rd, ... escape the next."""
    idx = np.arange(len(is_esc))
    run_start = np.maximum.accumulate(np.where(is_esc, -1, idx)) + 1  # first ESC of the run at i
    escaper = is_esc & ((idx - run_start) % 2 == 0)
    out = np.zeros(len(is_esc), dtype=bool)
    out[1:] = escaper[:-1]
    return out


def original_bytes(ids: np.ndarray, table: ByteTable) -> np.ndarray:
    """For each token, the UTF-8 bytes of the original text it accounts for (int64)."""
    ids = np.asarray(ids, dtype=np.int64)
    out = table.base[ids]
    lit = escaped(ids == table.esc)
    bad = lit & ~table.is_operator[ids] & ~table.leading_space[ids]
    if bad.any():
        raise CaseOpsError(f"token {int(np.argmax(bad))} follows an ESC but is neither an operator nor '▁'")
    out[lit & table.is_operator[ids]] = len(ESC.encode())
    out[lit & table.leading_space[ids]] += len(SP_SPACE.encode()) - 1
    return out
