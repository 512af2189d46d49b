"""JSON text of many messages of one family (a bulk send's siblings, ``synth_workers.wiremany``)
made from one encoding: the family's first message is encoded once with a marker in place
of each value that differs between siblings, and every sibling's text is that text with its
own values, each encoded alone, put in the markers' places.

A sibling differs from its family's first message only in its ids, argument reprs, group
index, delivery tag and body (``wiremany.sibling``); everything else is the same objects. The
text :func:`Template.fill` gives is the text the encoder would give the sibling's message
(strings as ``json.encoder.encode_basestring_ascii`` writes them, as kombu's encoder does
with ``ensure_ascii``); ``tests/test_wiresplice.py`` compares them. :func:`template` returns
``None`` (the caller encodes each message whole) when a marker is not found exactly once in
the encoded text.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from json.encoder import encode_basestring_ascii
from typing import Any

#: A marker's text before encoding: no id, repr or base64 text holds a NUL character.
_MARK = "\x00synth-splice:{}\x00"


def mark(name: str) -> str:
    """The marker to put in place of value ``name`` before encoding the model."""
    return _MARK.format(name)


def encoded(value: Any) -> str:
    """``value`` as the template's encoder writes it: a string (or, for an ``int`` that is
    not a ``bool``, its digits); ``TypeError`` for anything else."""
    if isinstance(value, str):
        return encode_basestring_ascii(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return int.__repr__(value)
    raise TypeError(f"a spliced value is a str or an int, not {type(value).__name__}")


class Template:
    """An encoded model split at its markers: :meth:`fill` joins the parts with values."""

    __slots__ = ("_names", "_parts")

    def __init__(self, parts: list[str], names: list[str]) -> None:
        self._parts, self._names = parts, names

    def fill(self, values: Mapping[str, Any]) -> str:
        """The text with ``values[name]`` (:func:`encoded`) in each marker's place."""
        parts, names = self._parts, self._names
        pieces = [parts[0]]
        for n, name in enumerate(names, 1):
            pieces.append(encoded(values[name]))
            pieces.append(parts[n])
        return "".join(pieces)


def template(model: Any, names: list[str], encode: Callable[[Any], str]) -> Template | None:
    """Encode ``model`` (holding :func:`mark` of each of ``names`` where the values go) with
    ``encode`` and split it at the markers; ``None`` when a marker is not there exactly once
    (some other value of the model holds one: the caller encodes each message whole)."""
    text = encode(model)
    quoted = {encode_basestring_ascii(mark(name)): name for name in names}
    pattern = "|".join(re.escape(q) for q in quoted)
    pieces = re.split(f"({pattern})", text)
    parts, order = pieces[0::2], [quoted[q] for q in pieces[1::2]]
    if sorted(order) != sorted(names):
        return None
    return Template(parts, order)
