"""Strict JSON reader that remembers where every key and value starts.

Python's json module gives no positions for values, accepts NaN/Infinity and silently keeps the last of
duplicate keys. A config checker must point at the exact line and column and must refuse what other JSON
readers would read differently, so this reader is strict (RFC 8259, no extensions) and iterative (a
10,000-deep file is an error message, not a RecursionError).
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass, field
from json.decoder import JSONDecodeError, scanstring

MAX_DEPTH = 256
MAX_BYTES = 16 * 1024 * 1024

_WS = re.compile(r"[ \t\n\r]*")
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)?")
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|-Infinity")
_LITERALS = {"true": True, "false": False, "null": None}


class JSONSyntaxError(ValueError):
    """A problem that stops reading: message plus 1-based line and column (in characters)."""

    def __init__(self, message: str, line: int, col: int, hint: str = ""):
        super().__init__(f"{line}:{col}: {message}")
        self.message, self.line, self.col, self.hint = message, line, col, hint


@dataclass
class Problem:
    """A problem found while reading that does not stop it (e.g. a duplicate key)."""

    message: str
    line: int
    col: int
    pointer: str
    hint: str = ""


@dataclass
class Document:
    value: object
    value_pos: dict[str, tuple[int, int]] = field(default_factory=dict)
    key_pos: dict[str, tuple[int, int]] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)

    def position(self, pointer: str, *, key: bool = False) -> tuple[int, int]:
        """Position of the value (or the key) at `pointer`, else of its nearest ancestor that exists."""
        table = self.key_pos if key else self.value_pos
        if pointer in table:
            return table[pointer]
        while pointer:
            pointer = pointer.rsplit("/", 1)[0]
            if pointer in self.key_pos:
                return self.key_pos[pointer]
            if pointer in self.value_pos:
                return self.value_pos[pointer]
        return self.value_pos.get("", (1, 1))


def escape_pointer_token(token: object) -> str:
    return str(token).replace("~", "~0").replace("/", "~1")


class _Lines:
    def __init__(self, text: str):
        self.starts = [0] + [m.end() for m in re.finditer("\n", text)]

    def at(self, offset: int) -> tuple[int, int]:
        index = bisect.bisect_right(self.starts, offset) - 1
        return index + 1, offset - self.starts[index] + 1


def decode_bytes(data: bytes) -> str:
    """Turn file bytes into text, refusing what is not a UTF-8 JSON text with a positioned error."""
    if not data.strip():
        raise JSONSyntaxError("file is empty", 1, 1, "a clawbot config is a JSON object; the smallest valid one is {}")
    if len(data) > MAX_BYTES:
        raise JSONSyntaxError(f"file is {len(data)} bytes; configs larger than {MAX_BYTES} bytes are refused", 1, 1)
    if data.startswith(b"\xef\xbb\xbf"):
        raise JSONSyntaxError("file starts with a UTF-8 byte-order mark (BOM)", 1, 1, "save the file as UTF-8 without BOM")
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise JSONSyntaxError("file is UTF-16, not UTF-8", 1, 1, "save the file as UTF-8")
    nul = data.find(b"\x00")
    if nul != -1:
        line = data.count(b"\n", 0, nul) + 1
        col = nul - (data.rfind(b"\n", 0, nul) + 1) + 1
        raise JSONSyntaxError("file contains NUL bytes: it looks like a binary file, not JSON", line, col)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        good = data[: exc.start].decode("utf-8")
        line, col = _Lines(good).at(len(good))
        raise JSONSyntaxError(
            f"byte 0x{data[exc.start]:02x} is not valid UTF-8", line, col, "save the file as UTF-8"
        ) from None


def parse(text: str) -> Document:
    """Parse one JSON text; raise JSONSyntaxError on the first syntax error."""
    return _Parser(text).run()


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.n = len(text)
        self.lines = _Lines(text)
        self.doc = Document(None)

    # -- helpers -------------------------------------------------------------------------------
    def fail(self, offset: int, message: str, hint: str = "") -> JSONSyntaxError:
        line, col = self.lines.at(min(offset, self.n))
        return JSONSyntaxError(message, line, col, hint)

    def ws(self, i: int) -> int:
        return _WS.match(self.text, i).end()

    def describe(self, i: int) -> str:
        if i >= self.n:
            return "end of file"
        return repr(self.text[i])

    def unexpected(self, i: int, expected: str) -> JSONSyntaxError:
        ch = self.text[i] if i < self.n else ""
        if ch == "/" and self.text[i : i + 2] in ("//", "/*"):
            return self.fail(i, "comments are not allowed in JSON", "remove the comment (describe settings in docs instead)")
        if ch == "'":
            return self.fail(i, "strings must be in double quotes, not single quotes")
        if i >= self.n:
            return self.fail(i, f"unexpected end of file: expected {expected}", "the file is cut short or a bracket is missing")
        return self.fail(i, f"expected {expected}, found {self.describe(i)}")

    def string(self, i: int) -> tuple[str, int]:
        try:
            return scanstring(self.text, i + 1, True)
        except JSONDecodeError as exc:
            message = exc.msg.lower().removesuffix(" at").removesuffix(" starting at")
            raise self.fail(exc.pos, message, "escape control characters (\\n, \\t, \\u0001) inside strings") from None

    def key(self, i: int, frame: list, closing_ok: bool) -> int:
        """Read `"key" :` at i for the object in frame; return the offset of its value."""
        if i < self.n and self.text[i] != '"':
            if closing_ok:
                raise self.unexpected(i, "a key in double quotes or '}'")
            raise self.unexpected(i, "a key in double quotes")
        if i >= self.n:
            raise self.unexpected(i, "a key in double quotes")
        key, end = self.string(i)
        obj, parent_pointer = frame[0], frame[1]
        pointer = f"{parent_pointer}/{escape_pointer_token(key)}"
        line, col = self.lines.at(i)
        if key in obj:
            first = self.doc.key_pos[pointer]
            self.doc.problems.append(
                Problem(
                    f"duplicate key '{key}' (first at line {first[0]}, column {first[1]})",
                    line,
                    col,
                    pointer,
                    "JSON readers disagree on which of two equal keys wins: keep exactly one",
                )
            )
            # Keep the first occurrence; remember the duplicate's position only for this message.
            frame[3] = None
        else:
            self.doc.key_pos[pointer] = (line, col)
            frame[3] = key
        j = self.ws(end)
        if j >= self.n or self.text[j] != ":":
            raise self.unexpected(j, "':' after the key")
        frame[4] = pointer
        return self.ws(j + 1)

    # -- main loop -----------------------------------------------------------------------------
    def run(self) -> Document:
        text, n = self.text, self.n
        stack: list[list] = []  # [container, pointer, is_object, current key, child pointer]
        i = self.ws(0)
        if i >= n:
            raise self.fail(0, "file is empty", "a clawbot config is a JSON object; the smallest valid one is {}")
        while True:
            # --- read a value starting at i -------------------------------------------------
            pointer = stack[-1][4] if stack else ""
            self.doc.value_pos.setdefault(pointer, self.lines.at(i))
            ch = text[i] if i < n else ""
            if ch in "{[" and ch:
                if len(stack) >= MAX_DEPTH:
                    raise self.fail(i, f"nesting is deeper than {MAX_DEPTH} levels", "a clawbot config is a few levels deep")
                is_object = ch == "{"
                frame = [{} if is_object else [], pointer, is_object, None, None]
                stack.append(frame)
                i = self.ws(i + 1)
                closer = "}" if is_object else "]"
                if i < n and text[i] == closer:
                    value, i = stack.pop()[0], i + 1
                elif is_object:
                    i = self.key(i, frame, closing_ok=True)
                    continue
                else:
                    frame[4] = f"{pointer}/0"
                    continue
            elif ch == '"':
                value, i = self.string(i)
            elif ch and (ch == "-" or ch.isdigit()):
                m = _NUMBER.match(text, i)
                if text.startswith("-Infinity", i):
                    raise self.fail(i, "-Infinity is not valid JSON", "use a finite number")
                if not m:
                    raise self.fail(i, f"invalid number {self.describe(i)}")
                end = m.end()
                if end < n and (text[end].isalnum() or text[end] in ".+-_"):
                    raise self.fail(i, f"invalid number {text[i:end + 1]!r}", "JSON numbers have no leading zeros, hex or trailing dots")
                value = int(text[i:end]) if not (m.group(1) or m.group(2)) else float(text[i:end])
                if isinstance(value, float) and value in (float("inf"), float("-inf")):
                    raise self.fail(i, "number is too large", "use a finite number")
                i = end
            else:
                m = _WORD.match(text, i)
                word = m.group(0) if m else ""
                if word in _LITERALS:
                    value, i = _LITERALS[word], m.end()
                elif word in ("NaN", "Infinity", "-Infinity"):
                    raise self.fail(i, f"{word} is not valid JSON", "use a finite number (or null)")
                elif word in ("True", "False", "None"):
                    raise self.fail(i, f"{word} is not valid JSON", f"write {word.lower() if word != 'None' else 'null'}")
                elif stack and ch in "}]" and ch:
                    raise self.fail(i, "trailing comma before closing bracket", "remove the last comma")
                else:
                    raise self.unexpected(i, "a value")

            # --- attach the value and read what follows -------------------------------------
            while True:
                if not stack:
                    self.doc.value = value
                    i = self.ws(i)
                    if i < n:
                        raise self.unexpected(i, "end of file after the top-level value")
                    return self.doc
                frame = stack[-1]
                container = frame[0]
                if frame[2]:
                    if frame[3] is not None:
                        container[frame[3]] = value
                else:
                    container.append(value)
                i = self.ws(i)
                ch = text[i] if i < n else ""
                closer = "}" if frame[2] else "]"
                if ch == ",":
                    comma = i
                    i = self.ws(i + 1)
                    if i < n and text[i] == closer:
                        raise self.fail(comma, "trailing comma before closing bracket", "remove this comma")
                    if frame[2]:
                        i = self.key(i, frame, closing_ok=False)
                    else:
                        frame[4] = f"{frame[1]}/{len(container)}"
                    break
                if ch == closer:
                    value, i = stack.pop()[0], i + 1
                    continue
                raise self.unexpected(i, f"',' or '{closer}'")
