"""The report's prose: the named blocks of template.md, filled with the run's values.

template.md holds blocks, each opened by a line `<!-- block: NAME -->` and running to the
next; `$name` (or `${name}` next to a word) is a value the code fills (string.Template).
A line holding nothing but a placeholder whose value is empty disappears with its
paragraph break, so an optional paragraph leaves no gap.
"""
from __future__ import annotations

import functools
import re
from pathlib import Path
from string import Template

TEMPLATE = Path(__file__).with_name("template.md")
_BLOCK_START = re.compile(r"^<!-- block: (\w+) -->\n", re.MULTILINE)
_ALONE = re.compile(r"\$(?:(\w+)|\{(\w+)\})")


@functools.cache
def blocks(path: Path = TEMPLATE) -> dict[str, str]:
    """Each block's text, without the blank lines around it (the text before the first block is a comment)."""
    pieces = _BLOCK_START.split(Path(path).read_text(encoding="utf-8"))
    return {name: body.strip("\n") for name, body in zip(pieces[1::2], pieces[2::2])}


def fill(name: str, **values) -> str:
    """Block `name` with its placeholders filled: every one must be given, and nothing else."""
    text = blocks()[name]
    template = Template(_without_empty_lines(text, values))
    expected = set(Template(text).get_identifiers())
    if set(values) != expected:
        raise KeyError(f"template.md block {name!r}: placeholders {sorted(expected)}, given {sorted(values)}")
    return template.substitute({key: str(value) for key, value in values.items()})


def _without_empty_lines(text: str, values: dict) -> str:
    """The block without its lines that hold only an empty placeholder, and without the blank line that
    would then double another."""
    lines = []
    for line in text.split("\n"):
        alone = _ALONE.fullmatch(line)
        if alone and values.get(alone.group(1) or alone.group(2)) == "":
            continue
        if line == "" and (not lines or lines[-1] == ""):
            continue
        lines.append(line)
    while lines and lines[-1] == "":
        lines.pop()
    return "\n".join(lines)
