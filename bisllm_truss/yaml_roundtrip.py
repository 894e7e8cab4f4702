"""Comment-preserving edits of a YAML document with ruamel.yaml in round-trip mode.

Loading and dumping
    ``make_yaml`` + ``dump`` round-trip a document so that an untouched file comes back byte for
    byte: quoting, number spelling, ``null``/``~`` and ``True``/``FALSE`` keep their spelling,
    long strings are never re-wrapped, the indentation found by ``detect_indent`` is reused, and
    comments above an explicit ``---``, a missing final newline and CRLF line ends survive.

ruamel's comment model
    ruamel does not attach a comment to the key it describes. It stores comments on the node
    *before* them, in that node's ``.ca.items[key]`` slot:

    * the **region after a key**: one token holding the rest of the key's last line (its
      end-of-line comment, or just ``"\\n"``) followed by every full comment or blank line up to
      the next key. It sits at index 2 of a mapping key's slot and index 0 of a sequence item's,
      and when the value is a non-empty block collection it belongs to that collection's deepest
      last child, since that is the line the comments follow;
    * the **head of a parent**: the lines between ``parent:`` and its first child, kept in the
      region after the parent key itself (sometimes partly as a token list at index 3);
    * **pre-comments** (index 1): a list of tokens *above* a key. ruamel uses it for the lines
      after a flow-style value (``b: {x: 1}``); these helpers also use it for the lines above
      the document's first key, which has no key before it.

    So the comment that describes key B physically lives on key A, the key above it. Deleting or
    moving A with plain mapping operations loses B's comment along with A's slot, and carrying
    A's slot along instead would move B's comment to wherever A went.

Why these helpers
    They edit regions as plain text made of whole lines (the first line is the rest of the line
    the region follows, the others keep their own indentation), and split and re-join them so
    that every comment line stays next to the key it was written above: ``remove_key``,
    ``take_key``, ``rename_key``, ``insert_first``, ``insert_after``, ``to_block`` and
    ``add_eol_comment``. A ``Parent`` is the ``(mapping, key)`` pair that holds the mapping being
    edited; it is needed because that mapping's head lives in the parent's slot. ``Parent`` is
    ``None`` for the document's top-level mapping.
"""

from __future__ import annotations

import io
import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.constructor import RoundTripConstructor
from ruamel.yaml.error import CommentMark
from ruamel.yaml.representer import RoundTripRepresenter
from ruamel.yaml.scalarstring import DoubleQuotedScalarString, SingleQuotedScalarString
from ruamel.yaml.tokens import CommentToken

__all__ = [
    "Entry",
    "Indent",
    "Parent",
    "add_eol_comment",
    "block_column",
    "comments_above",
    "detect_indent",
    "dump",
    "insert_after",
    "insert_first",
    "is_null",
    "is_number",
    "make_yaml",
    "remove_key",
    "rename_key",
    "scalar_text",
    "take_key",
    "to_block",
]

Parent = tuple[CommentedMap, Any]
"""``(mapping, key)`` holding the mapping being edited; its head lives in that key's slot."""


# --- YAML I/O that keeps the spelling of nulls and booleans -------------------------------------


class _NullText:
    """A null that remembers how it was written, so `null`/`~` do not turn into empty values."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text


class _BoolText(int):
    """A boolean written in a non-canonical spelling (`True`, `FALSE`), kept as written."""

    text: str


class _Constructor(RoundTripConstructor):
    pass


class _Representer(RoundTripRepresenter):
    pass


_BASE_BOOL = RoundTripConstructor.yaml_constructors["tag:yaml.org,2002:bool"]


def _construct_null(self: _Constructor, node: Any) -> Any:
    self.construct_scalar(node)
    return _NullText(node.value) if node.value else None  # `key:` stays empty on output


def _construct_bool(self: _Constructor, node: Any) -> Any:
    value = _BASE_BOOL(self, node)
    if node.anchor or node.value in ("true", "false"):
        return value
    spelled = _BoolText(bool(value))
    spelled.text = node.value
    return spelled


# Registered on private subclasses so other ruamel users in the process are unaffected.
_Constructor.add_constructor("tag:yaml.org,2002:null", _construct_null)
_Constructor.add_constructor("tag:yaml.org,2002:bool", _construct_bool)
_Representer.add_representer(
    _NullText, lambda self, data: self.represent_scalar("tag:yaml.org,2002:null", data.text)
)
_Representer.add_representer(
    _BoolText, lambda self, data: self.represent_scalar("tag:yaml.org,2002:bool", data.text)
)


class Indent(NamedTuple):
    """ruamel's indentation settings: see ``YAML.indent``."""

    mapping: int
    sequence: int
    offset: int


_KEY_OPENER = re.compile(r"""^(?:"[^"]*"|'[^']*'|[^\s#'"-][^#]*?):\s*(?:#.*)?$""")


def _indent_of(line: str) -> int:
    return len(line) - len(line.lstrip())


def detect_indent(text: str) -> Indent:
    """Guess the indentation from the first nested mapping and the first block sequence.

    ruamel applies one indentation to the whole document, so re-using the user's keeps the lines
    we did not touch unchanged.
    """
    lines = [ln.rstrip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    mapping = sequence = offset = None
    for cur, nxt in itertools.pairwise(lines):
        if not _KEY_OPENER.match(cur.lstrip()):
            continue
        col, ncol = _indent_of(cur), _indent_of(nxt)
        nbody = nxt.lstrip()
        if ncol <= col and not (ncol == col and nbody.startswith("- ")):
            continue
        if nbody.startswith("- ") and sequence is None:
            offset = ncol - col  # where the dash sits
            sequence = offset + len(nbody) - len(nbody[1:].lstrip())  # where the item starts
        elif not nbody.startswith("-") and mapping is None:
            mapping = ncol - col
        if mapping is not None and sequence is not None:
            break
    mapping = mapping or 2
    if sequence is None or sequence < 2:
        sequence, offset = mapping + 2, mapping
    return Indent(mapping, sequence, offset or 0)


def make_yaml(text: str, indent: Indent) -> YAML:
    """A round-trip loader/dumper that writes text back the way it was read."""
    yaml = YAML(typ="rt")
    yaml.Constructor = _Constructor
    yaml.Representer = _Representer
    yaml.preserve_quotes = True
    yaml.width = 1 << 20  # never re-wrap long strings
    yaml.indent(mapping=indent.mapping, sequence=indent.sequence, offset=indent.offset)
    first = next((ln for ln in text.splitlines() if ln.strip() and not ln.startswith("#")), "")
    yaml.explicit_start = first.rstrip() == "---"
    return yaml


def dump(yaml: YAML, data: Any, original: str) -> str:
    """Dump data with yaml (from ``make_yaml``), restoring what ruamel loses of original."""
    buf = io.StringIO()
    yaml.dump(data, buf)
    out = buf.getvalue()
    # ruamel drops comments above an explicit `---`; put the user's lines back.
    lines = original.splitlines(keepends=True)
    start = next((i for i, ln in enumerate(lines) if ln.rstrip() == "---"), 0)
    if yaml.explicit_start and start and out.startswith("---"):
        out = "".join(lines[:start]).replace("\r\n", "\n") + out
    if not original.endswith("\n") and out.endswith("\n"):
        out = out[:-1]
    if "\r\n" in original:  # ruamel writes "\n"; comment text may still carry the "\r"
        out = out.replace("\r\n", "\n").replace("\n", "\r\n")
    return out


# --- scalars -------------------------------------------------------------------------------------


def is_null(value: Any) -> bool:
    """True for a YAML null, however it was spelled."""
    return value is None or isinstance(value, _NullText)


def is_number(value: Any) -> bool:
    """True for an int or float; booleans (an int subclass), however spelled, are not numbers."""
    return isinstance(value, (int, float)) and not isinstance(value, (bool, _BoolText))


def scalar_text(value: Any) -> str:
    """Render a value roughly as YAML, for comments and messages."""
    if isinstance(value, (_NullText, _BoolText)):
        return value.text
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, DoubleQuotedScalarString):
        return f'"{value}"'
    if isinstance(value, SingleQuotedScalarString):
        return f"'{value}'"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {scalar_text(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(scalar_text(v) for v in value) + "]"
    return str(value)


# --- comment regions -----------------------------------------------------------------------------
#
# A region is text made of whole lines: its first line is the rest of the line it follows
# ("# eol comment\n", or just "\n"), then full comment/blank lines with their indentation.


def _split_eol(region: str) -> tuple[str, str]:
    """(the rest of the line the region follows, the full lines after it)."""
    cut = region.find("\n") + 1 or len(region)
    return region[:cut], region[cut:]


def _tokens_text(tokens: list[CommentToken] | None) -> str:
    """Full-line comment tokens as text, with their indentation written out."""
    return "".join(
        tok.value if not tok.value.strip() else " " * tok.column + tok.value for tok in tokens or []
    )


def _slot(m: CommentedMap | CommentedSeq, key: Any) -> tuple[list[Any], int]:
    """The comment slot holding the region after the last line of m[key], and its index."""
    while True:
        value = m[key]
        is_coll = isinstance(value, (CommentedMap, CommentedSeq))
        if is_coll and not value:
            # An empty block collection would be emitted below the comment; keep it `{}`/`[]`.
            value.fa.set_flow_style()
        if not is_coll or not value or value.fa.flow_style():
            break
        m, key = value, (list(value)[-1] if isinstance(value, CommentedMap) else len(value) - 1)
    entry = m.ca.items.setdefault(key, [None, None, None, None])
    return entry, 0 if isinstance(m, CommentedSeq) else 2


def _set_token(entry: list[Any], idx: int, text: str) -> None:
    tok = entry[idx]
    if not text or text == "\n":
        entry[idx] = None
    elif isinstance(tok, CommentToken):
        tok.value = text  # keeps the original column of an end-of-line comment
    else:
        entry[idx] = CommentToken(text, CommentMark(0))


def _region(m: CommentedMap | CommentedSeq, key: Any) -> str:
    entry, idx = _slot(m, key)
    return entry[idx].value if entry[idx] is not None else ""


def _set_region(m: CommentedMap | CommentedSeq, key: Any, text: str) -> None:
    entry, idx = _slot(m, key)
    _set_token(entry, idx, text)


def _append_region(m: CommentedMap | CommentedSeq, key: Any, lines: str) -> None:
    if lines:
        _set_region(m, key, (_region(m, key) or "\n") + lines)


def _head(parent: Parent) -> str:
    """Lines between `key:` and the first child of the mapping parent[key]."""
    pmap, pkey = parent
    entry = pmap.ca.items.get(pkey) or [None] * 4
    rest = _split_eol(entry[2].value)[1] if entry[2] is not None else ""
    return rest + _tokens_text(entry[3])


def _set_head(parent: Parent, text: str) -> None:
    pmap, pkey = parent
    entry = pmap.ca.items.setdefault(pkey, [None, None, None, None])
    eol = _split_eol(entry[2].value)[0] if entry[2] is not None else ""
    entry[3] = None
    _set_token(entry, 2, (eol or "\n") + text)


def _pre(m: CommentedMap, key: Any) -> str:
    """Lines ruamel filed as pre-comments of key (it does so e.g. after a flow-style value)."""
    entry = m.ca.items.get(key)
    return _tokens_text(entry[1]) if entry else ""


def _before(m: CommentedMap, idx: int, parent: Parent | None) -> str:
    """All comment/blank lines between m's key idx and the line above it."""
    keys = list(m)
    if idx > 0:
        return _split_eol(_region(m, keys[idx - 1]))[1] + _pre(m, keys[idx])
    return (_head(parent) if parent else "") + _pre(m, keys[idx])


def _set_before(m: CommentedMap, idx: int, parent: Parent | None, text: str) -> None:
    keys = list(m)
    if keys[idx] in m.ca.items:
        m.ca.items[keys[idx]][1] = None
    if idx > 0:
        _set_region(m, keys[idx - 1], _split_eol(_region(m, keys[idx - 1]))[0] + text)
    elif parent:
        _set_head(parent, text)
    else:  # first key of the document: ruamel keeps those lines as pre-comments of the key
        entry = m.ca.items.setdefault(keys[0], [None, None, None, None])
        entry[1] = [CommentToken(text, CommentMark(0))] if text else None


def _split_trailing(rest: str, column: int) -> tuple[str, str]:
    """Split region lines into those of the block above and those leading into a key at column.

    Comments indented deeper than the next key still describe the block above it.
    """
    lines = rest.splitlines(keepends=True)
    n = len(lines)
    while n and (not lines[n - 1].strip() or _indent_of(lines[n - 1]) <= column):
        n -= 1
    return "".join(lines[:n]), "".join(lines[n:])


def _key_column(m: CommentedMap, key: Any, fallback: int = 0) -> int:
    """Column of key as parsed; keys we inserted have none, so use a parsed sibling's."""
    pos = m.lc.data.get(key) or next(iter(m.lc.data.values()), None)
    return pos[1] if pos else fallback


def _shifted(tok: CommentToken, delta: int) -> CommentToken:
    """A copy of an end-of-line comment token, moved by delta columns (for a renamed key)."""
    return CommentToken(tok.value, CommentMark(max(tok.column + delta, 0)))


def _flow_changed(parent: Parent) -> None:
    """The `{...}` of parent[key] changed length: its end-of-line comment's old column is moot."""
    pmap, pkey = parent
    entry = pmap.ca.items.get(pkey)
    if entry and entry[2] is not None and entry[2].value.startswith("#"):
        entry[2] = CommentToken(entry[2].value, CommentMark(0))  # ruamel then uses one space


# --- editing -------------------------------------------------------------------------------------


@dataclass
class Entry:
    """A key to insert with ``insert_first``, with the comments that travel with it."""

    key: str
    value: Any
    lead: str = ""  # comment lines directly above the key
    eol: CommentToken | None = None  # its end-of-line comment


def block_column(m: CommentedMap, key: Any, fallback: int) -> int:
    """Column for a full-line comment among m's keys (a flow mapping has no such column)."""
    return fallback if m.fa.flow_style() else _key_column(m, key, fallback)


def comments_above(lines: Sequence[str], m: CommentedMap, key: Any) -> int:
    """How many comment lines sit directly above m[key] in the source lines m was loaded from."""
    pos = m.lc.data.get(key)
    line = pos[0] - 1 if pos else -1
    count = 0
    while line >= 0 and lines[line].lstrip().startswith("#"):
        count, line = count + 1, line - 1
    return count


def remove_key(m: CommentedMap, key: str, parent: Parent | None, placeholder: str = "") -> Any:
    """Delete m[key] and return its value.

    The key's own end-of-line comment goes with it; the comment lines after it (which describe
    the next key) stay, preceded by placeholder: whole lines to leave where the key was.
    """
    keys = list(m)
    idx = keys.index(key)
    rest = _split_eol(_region(m, key))[1]
    value = m[key]
    if isinstance(value, (CommentedMap, CommentedSeq)) and value and not value.fa.flow_style():
        rest = _split_trailing(rest, _key_column(m, key))[1]  # deeper lines were inside the block
    carry = _pre(m, key) + placeholder + rest
    flow = m.fa.flow_style()
    m.pop(key)
    m.ca.items.pop(key, None)
    if not m:
        m.fa.set_flow_style()
    if carry:
        if flow and parent:  # no comments inside `{...}`: put them after it
            pmap, pkey = parent
            eol, rest = _split_eol(_region(pmap, pkey))
            stay, move = _split_trailing(rest, _key_column(pmap, pkey))
            _set_region(pmap, pkey, (eol or "\n") + stay + carry + move)
            _flow_changed(parent)
        elif idx > 0:
            _append_region(m, keys[idx - 1], carry)
        elif m:  # the new first key: head lines, then what followed the deleted key
            head = _head(parent) if parent else ""
            _set_before(m, 0, parent, head + carry + _pre(m, next(iter(m))))
        elif parent:
            _append_region(parent[0], parent[1], carry)
    return value


def take_key(m: CommentedMap, key: str, parent: Parent | None, new_key: str, above: int) -> Entry:
    """Detach m[key] to move it elsewhere (with ``insert_first``) as new_key.

    Its end-of-line comment and the `above` comment lines that sat directly above it in the
    source (see ``comments_above``) come along.
    """
    idx = list(m).index(key)
    before = _before(m, idx, parent).splitlines(keepends=True)
    if m.fa.flow_style():  # nothing inside `{...}` is a comment; what follows it isn't ours
        above = 0
    # Bounded by the source: earlier deletions may have parked other comments right above it.
    n = len(before)
    while n and len(before) - n < above and before[n - 1].lstrip().startswith("#"):
        n -= 1
    _set_before(m, idx, parent, "".join(before[:n]))
    eol = None
    if not isinstance(m[key], (CommentedMap, CommentedSeq)):
        entry, slot = _slot(m, key)
        tok = entry[slot]
        text = _split_eol(tok.value)[0] if tok is not None else ""
        if text.startswith("#"):
            eol = _shifted(CommentToken(text, CommentMark(tok.column)), len(new_key) - len(key))
    value = remove_key(m, key, parent)
    return Entry(new_key, value, "".join(before[n:]), eol)


def rename_key(m: CommentedMap, old: str, new: str) -> None:
    """Rename m[old] to new in place, keeping its comments."""
    idx = list(m).index(old)
    comments = m.ca.items.pop(old, None)
    m.insert(idx, new, m.pop(old))
    if comments is not None:
        if isinstance(comments[2], CommentToken):  # keep the comment the same gap away
            comments[2] = _shifted(comments[2], len(new) - len(old))
        m.ca.items[new] = comments


def to_block(parent: Parent) -> None:
    """Turn the flow mapping parent[key] into a block one, keeping the comments around it."""
    pmap, pkey = parent
    m = pmap[pkey]
    trailing = _head(parent)  # for a flow value, these lines come after the `{...}` line
    _set_head(parent, "")
    tok = pmap.ca.items[pkey][2]
    if tok is not None:  # the end-of-line comment sat after `{...}`; now it follows `key:`
        column = _key_column(pmap, pkey) + len(str(pkey)) + 3
        pmap.ca.items[pkey][2] = CommentToken(tok.value, CommentMark(column))
    m.fa.set_block_style()
    _append_region(m, list(m)[-1], trailing)


def insert_first(parent: Parent, entries: list[Entry]) -> None:
    """Insert entries at the top of the mapping parent[key]; its old head comments follow them."""
    m = parent[0][parent[1]]
    if m and m.fa.flow_style():
        if not any(e.lead or e.eol is not None for e in entries):
            for i, e in enumerate(entries):
                m.insert(i, e.key, e.value)
            _flow_changed(parent)
            return
        to_block(parent)  # the comments that come along need block style
    was_empty = not m
    old_head = _head(parent)
    for i, e in enumerate(entries):
        m.insert(i, e.key, e.value)
        m.ca.items.pop(e.key, None)
    if was_empty:
        m.fa.set_block_style()
    _set_head(parent, entries[0].lead)
    for i, e in enumerate(entries):
        following = entries[i + 1].lead if i + 1 < len(entries) else old_head
        eol = e.eol.value if e.eol is not None else "\n"
        if e.eol is not None:
            m.ca.items[e.key] = [None, None, e.eol, None]
        _set_region(m, e.key, eol + following)


def insert_after(m: CommentedMap, after: Any, key: str, value: Any) -> None:
    """Insert key right after `after`; comments leading into the next key move below the new one."""
    eol, rest = _split_eol(_region(m, after))
    stay, move = _split_trailing(rest, _key_column(m, after))
    blank = re.match(r"(?:[ \t]*\n)*", move).group(0)  # keep the user's blank-line separation
    _set_region(m, after, eol + stay + blank)
    m.insert(list(m).index(after) + 1, key, value)
    _append_region(m, key, move)


def add_eol_comment(m: CommentedMap, key: str, column: int, text: str) -> None:
    """Attach `# text` after m[key]; column is where the line's content starts."""
    line = f"{key}: {scalar_text(m[key])}"
    token = CommentToken(f"# {text}\n", CommentMark(column + len(line) + 2))
    m.ca.items[key] = [None, None, token, None]
