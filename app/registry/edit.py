"""Changing a group's fields in the registry file by editing its lines, so the operator's comments, order and
formatting survive (`feature-gateway move` rewrites `backend`, `moving_to`, `moving_from`).

A YAML library would round-trip the document without its comments; editing the lines of one block-style
group is enough for the fields a move changes, and the result is parsed again before it is written.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path

from app.errors import RegistryError

_KEY = re.compile(r"^(?P<indent>\s*)(?P<key>[A-Za-z_][A-Za-z0-9_]*)\s*:(?P<rest>.*)$")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _content(line: str) -> bool:
    stripped = line.strip()
    return bool(stripped) and not stripped.startswith("#")


def set_group_fields(text: str, group: str, changes: Mapping[str, str | None], source: str = "<registry>") -> str:
    """`text` with the group's fields set (a value) or removed (None); a field not there is added after
    `backend`. RegistryError when the group is not written in block style under a top-level `groups:`."""
    lines = text.splitlines(keepends=True)
    top = next((i for i, line in enumerate(lines) if re.match(r"^groups\s*:\s*(#.*)?$", line.rstrip("\n"))), None)
    if top is None:
        raise RegistryError(source, "groups", "no top-level `groups:` block to edit")
    start = None
    child = None
    for i in range(top + 1, len(lines)):
        line = lines[i]
        if not _content(line):
            continue
        if _indent(line) == 0:
            break
        child = child if child is not None else _indent(line)
        match = _KEY.match(line.rstrip("\n"))
        if _indent(line) == child and match and match["key"] == group:
            if match["rest"].split("#")[0].strip():
                raise RegistryError(source, f"groups.{group}", "written in flow style ({...}): edit it by hand")
            start = i
            break
    if start is None or child is None:
        raise RegistryError(source, f"groups.{group}", "not found as a block under `groups:`")
    end = len(lines)
    fields: dict[str, int] = {}
    field_indent = None
    for i in range(start + 1, len(lines)):
        line = lines[i]
        if not _content(line):
            continue
        if _indent(line) <= child:
            end = i
            break
        field_indent = field_indent if field_indent is not None else _indent(line)
        match = _KEY.match(line.rstrip("\n"))
        if _indent(line) == field_indent and match:
            fields[match["key"]] = i
    if field_indent is None or "backend" not in fields:
        raise RegistryError(source, f"groups.{group}.backend", "not found in the group's block")
    while end > start + 1 and not _content(lines[end - 1]):
        end -= 1  # blank lines and comments after the block stay after it
    pad = " " * field_indent
    newline = "\n" if not lines[fields["backend"]].endswith("\r\n") else "\r\n"
    edits: dict[int, str | None] = {}
    added: list[str] = []
    for key, value in changes.items():
        if key in fields:
            edits[fields[key]] = None if value is None else f"{pad}{key}: {value}{newline}"
        elif value is not None:
            added.append(f"{pad}{key}: {value}{newline}")
    out: list[str] = []
    for i, line in enumerate(lines):
        if i in edits:
            replaced = edits[i]
            if replaced is not None:
                out.append(replaced)
        else:
            out.append(line)
        if i == fields["backend"]:
            out.extend(added)
    return "".join(out)


def write_atomically(path: Path, text: str) -> None:
    """Replace the file at once (a gateway reloading meanwhile reads the old or the new one, never half)."""
    fd, scratch = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        if path.exists():
            os.chmod(scratch, path.stat().st_mode & 0o7777)
        os.replace(scratch, path)
    except BaseException:
        Path(scratch).unlink(missing_ok=True)
        raise
