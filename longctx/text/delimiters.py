"""Delimiters: the template and chunk marker that lay documents out, and the escaping that keeps
document text from forging them.

A template is plain text with ``{text}`` once and optional ``{id}``, ``{title}``, ``{source}``;
``delimiters(doc, template)`` renders one document's header and footer. Text shaped like a
delimiter (the fixed start of a header, a footer or a chunk marker of the template and marker in
use) is escaped before packing by raising its first character one level: level 1 is its
fullwidth form ("[" -> "［", "<" -> "＜"), level 2 that character followed by U+2060 (WORD
JOINER), and so on. Matching ignores U+2060 and reads fullwidth forms as plain, so
``unescape(escape(x)) == x`` for any text, text that was already escaped included, and no
delimiter-shaped text is left. A fullwidth character reads to a model as the same symbol in
another font; an inserted invisible or one-byte character left it either confused or fooled.
"""

from __future__ import annotations

import functools
import html
import re
import string
from typing import NamedTuple

from .document import Document

# The default delimiter: one header line before each document and a closing tag after it,
# plain text (no special tokens), so the model sees each document's id, title and source.
DEFAULT_TEMPLATE = '<document id="{id}" title="{title}" source="{source}">\n{text}\n</document>\n\n'
TEMPLATE_FIELDS = ("id", "title", "source")
# The chunk marker (`Corpus.pack(chunk=...)`): a short line naming the document that closes each
# attention chunk's piece of its text. The title follows a space, so its words are the same
# tokens as in running text (" Slow Robin"), and comes right after the id, so a model can copy
# it by an induction lookup on the id (behind a shared ":" every title looks alike to one).
DEFAULT_MARKER = "[{id} {title}]\n"


def split_template(template: str) -> tuple[str, str]:
    """Template -> (header format string, footer format string), checking its fields."""
    header, footer, seen_text = [], [], 0
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ValueError(f"bad template {template!r}: {e}") from None
    for literal, field, spec, conv in parsed:
        out = footer if seen_text else header
        out.append(literal.replace("{", "{{").replace("}", "}}"))
        if field is None:
            continue
        if field == "text":
            if spec or conv:
                raise ValueError("template: {text} takes no format spec or conversion")
            seen_text += 1
            continue
        if field not in TEMPLATE_FIELDS:
            raise ValueError(
                f"template field {{{field}}} is unknown; allowed: {{text}}, "
                + ", ".join(f"{{{f}}}" for f in TEMPLATE_FIELDS)
            )
        out.append("{" + field + ("!" + conv if conv else "") + (":" + spec if spec else "") + "}")
    if seen_text != 1:
        raise ValueError(f"template must contain {{text}} exactly once, found {seen_text}: {template!r}")
    return "".join(header), "".join(footer)


def delimiters(doc: Document, template: str = DEFAULT_TEMPLATE) -> tuple[str, str]:
    """The (header, footer) strings `pack` puts around `doc` with this template."""
    return render(doc, *split_template(template))


def render(doc: Document, header_fmt: str, footer_fmt: str) -> tuple[str, str]:
    fields = {"id": str(doc.id), "title": _attr(doc.title), "source": _attr(doc.source or "")}
    return header_fmt.format(**fields), footer_fmt.format(**fields)


_ATTR_BREAK = re.compile(r"[\x00-\x1f\x7f\u2028\u2029]+")


_ATTR_SPECIAL = re.compile(r"[&<>\"'\x00-\x1f\x7f\u2028\u2029]")


def _attr(value: str) -> str:
    """A value for the delimiter line: HTML-escaped, control characters and newlines as spaces."""
    if _ATTR_SPECIAL.search(value) is None:
        return value  # the common case, checked first: 100K documents pack noticeably faster
    return _ATTR_BREAK.sub(" ", html.escape(value, quote=True))


# Escaping delimiter look-alikes in document text (see `escape`).
ESCAPE = "\u2060"  # WORD JOINER: zero-width
# What a field of a delimiter looks like in text: an id is ASCII digits (unless formatted
# with a spec), other fields anything on one line.
_FIELD_TEXT = rf"[^\n{ESCAPE}]*?"


def _fullwidth(c: str) -> str | None:
    """The fullwidth form of a printable ASCII character ("[" -> "［"), else None."""
    return chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else None


def escape(text: str, template: str = DEFAULT_TEMPLATE, marker: str = DEFAULT_MARKER) -> str:
    """`text` with every delimiter look-alike neutralised, as `pack` packs it; reversible:
    ``unescape(escape(x, t, m), t, m) == x`` for every string x.

    A look-alike is text that matches the fixed beginning of a delimiter of `template` (its
    header, its footer) or of the chunk `marker`: the delimiter's first literal text (leading
    whitespace dropped) and, when a field follows it, the field and the literal after it. For
    the defaults: ``<document id="<digits>" title="``, ``</document>`` and ``[<digits> ``.

    Escaping raises the *level* of a look-alike's first character by one. Level 0 is the
    character itself, level 1 its fullwidth form (``[`` -> ``［``, ``<`` -> ``＜``), level 2
    the character followed by ESCAPE (U+2060, zero-width), level 3 the fullwidth form
    followed by ESCAPE, and so on (a character with no fullwidth form, i.e. not printable
    ASCII, takes one ESCAPE per level). So ``</document>`` becomes ``＜/document>`` and
    ``[3 Red Falcon]`` becomes ``［3 Red Falcon]``: readable, and with no delimiter token in it
    (a model trained on these layouts keys on the ``[`` and ``<`` tokens: an ESCAPE after them
    leaves the small embedded model misreading the text, the fullwidth form does not:
    tests/test_forgery.py).
    Look-alikes are found in the text with ESCAPEs taken out and the fullwidth forms of the
    delimiters' first characters read as those characters, and `unescape` lowers the same
    characters' levels: that is what makes it reversible for any text, escaped ones included,
    and leaves no look-alike in the result. Text without look-alikes, ESCAPEs or such
    fullwidth characters is returned as is; with only look-alikes, its length is unchanged.
    """
    return rewrite(text, lookalikes(template, marker), +1)[0]


def unescape(text: str, template: str = DEFAULT_TEMPLATE, marker: str = DEFAULT_MARKER) -> str:
    """The inverse of `escape` with the same `template` and `marker`: the level of the first
    character of each look-alike lowered by one (found as `escape` finds them)."""
    return rewrite(text, lookalikes(template, marker), -1)[0]


class Lookalikes(NamedTuple):
    """The compiled look-alikes of a layout (`lookalikes`)."""

    search: re.Pattern  # the first look-alike (the common case: none)
    sites: re.Pattern  # every start, overlapping ones included (a lookahead)
    firsts: str  # the delimiters' first characters
    wide: dict[str, str]  # fullwidth form -> character, for those of `firsts` that have one


@functools.lru_cache(maxsize=16)
def lookalikes(template: str, marker: str) -> Lookalikes | None:
    """The look-alikes of a template's header and footer and of a marker, or None when there is
    nothing to look for. ValueError for a delimiter that can't be told from text (see
    `_signature`)."""
    header, footer = split_template(template)
    try:
        marker_fmt, _ = split_template(marker + "{text}")
    except ValueError as e:
        raise ValueError(f"bad marker {marker!r}: {e}") from None
    sigs = [
        sig
        for fmt, what in ((header, "header"), (footer, "footer"), (marker_fmt, "marker"))
        if (sig := _signature(fmt, what, marker if what == "marker" else template))
    ]
    if not sigs:
        return None
    firsts = "".join(sorted({first for first, _ in sigs}))
    alternatives = "|".join(re.escape(first) + rest for first, rest in sigs)
    return Lookalikes(
        re.compile(alternatives),
        re.compile(f"(?=(?:{alternatives}))"),
        firsts,
        {_fullwidth(c): c for c in firsts if _fullwidth(c)},
    )


def _signature(fmt: str, what: str, given: str) -> tuple[str, str] | None:
    """`fmt`'s look-alikes (see `escape`): (first character, regex of the rest), or None for a delimiter of whitespace
    only. ValueError if it starts with a field (no fixed text to recognise it by) or its fixed
    text is one character (an ESCAPE after that character would not break it)."""
    parts, literal = [], ""  # (literal before a field, field, spec, conversion); escaped braces split literals
    for lit, field, spec, conv in string.Formatter().parse(fmt):
        literal += lit
        if field is not None:
            parts.append((literal, field, spec, conv))
            literal = ""
    parts.append((literal, None, None, None))
    first, field, spec, conv = parts[0]
    first = first.lstrip()
    if field is None:
        first = first.rstrip()
        if not first:
            return None
        pattern = after = ""
    elif not first:
        raise ValueError(
            f"the {what} of {given!r} starts with a field: it needs fixed text first (e.g. "
            f"'# {{title}}') so that pack can escape its look-alikes in document text"
        )
    else:
        pattern = "[0-9]+" if field == "id" and not spec and not conv else _FIELD_TEXT
        after = re.escape(parts[1][0].rstrip("\r\n"))  # a line break at the end may be the text's own
    if ESCAPE in first + after:
        raise ValueError(f"the {what} of {given!r} holds ESCAPE (U+2060), which pack uses to escape look-alikes")
    if len(first) < 2 and not (pattern == "[0-9]+" or after):
        raise ValueError(
            f"the {what} of {given!r} has one character of fixed text ({first!r}): too short "
            "to tell from document text; make it longer"
        )
    return first[0], re.escape(first[1:]) + pattern + after


def rewrite(text: str, looks: Lookalikes | None, step: int) -> tuple[str, list[tuple[int, int]]]:
    """`escape` (step +1) or `unescape` (step -1) of `text`, and where its length changed:
    (index in `text`, chars added) for each changed character, in order."""
    if looks is None or (step < 0 and ESCAPE not in text and not any(w in text for w in looks.wide)):
        return text, []
    if ESCAPE not in text and not any(w in text for w in looks.wide):
        if looks.search.search(text) is None:
            return text, []  # the common case, checked first: one search per document
        chars, grown = list(text), []
        for m in looks.sites.finditer(text):  # level 0 -> 1
            i = m.start()
            chars[i] = _fullwidth(chars[i]) or chars[i] + ESCAPE
            grown += [(i, len(chars[i]) - 1)] if len(chars[i]) > 1 else []
        return "".join(chars), grown
    # The general case: units of one character and the ESCAPEs after it; look-alikes are found
    # in the text of the units' base characters, and their first units change level.
    lead = len(text) - len(text.lstrip(ESCAPE))
    units = re.findall(f"[^{ESCAPE}]{ESCAPE}*", text[lead:])
    base = [looks.wide.get(u[0], u[0]) for u in units]
    grown, starts, at = [], [], lead
    for u in units:
        starts.append(at)
        at += len(u)
    for m in looks.sites.finditer("".join(base)):
        i, c = m.start(), base[m.start()]
        wide = _fullwidth(c)
        run = len(units[i]) - 1
        level = (2 * run + (units[i][0] != c)) if wide else run
        level = max(level + step, 0)
        new = ((wide if level % 2 else c) + ESCAPE * (level // 2)) if wide else c + ESCAPE * level
        if len(new) != len(units[i]):
            grown.append((starts[i], len(new) - len(units[i])))
        units[i] = new
    return text[:lead] + "".join(units), grown
