"""Read the lists of a ``keys.pkl`` a chunk at a time, without unpickling the whole file.

A LUPerson ``keys.pkl`` is one pickle of a list of 10M+ key strings (LUPerson-NL: a dict of such a
list and a list of as many tracker pids). ``pickle.load`` holds every key as a Python string at once
(about 140 B per image) before the first one can be checked. :class:`PickleLists` walks the opcodes
instead and hands out the items of each list in chunks:

    lists = PickleLists(path)
    for name, items in lists:        # name: the dict key holding the list, None for a top-level list
        ...
    lists.top, lists.lengths         # "list" or "dict"; items per list name
    lists.kinds                      # a dict's entries: key -> "list", "str" or "int"

Only the shape Python's pickler writes for a list of str/int, or a dict whose values are such lists
(or str/int scalars), is read: protocols 2 to 5, strings and ints only, no object referenced twice.
Anything else (an older text protocol, None, floats, tuples, nested containers, a memo reference,
a truncated file) raises :class:`UnsupportedPickle`, and the caller falls back to a full, restricted
unpickling. Like that unpickler it never builds anything but str and int objects.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Iterator

_BLOCK = 1 << 22  # bytes read from the file at a time


class UnsupportedPickle(Exception):
    """The pickle is not of the simple shape this reader handles; unpickle it whole instead."""


class _List:
    __slots__ = ("name",)

    def __init__(self, name: str | None):
        self.name = name


class _Dict:
    __slots__ = ()


class PickleLists:
    """The lists of a pickle of a list, or of a dict of lists, as ``(name, items)`` chunks in file order."""

    def __init__(self, path: str | Path, chunk: int = 1 << 16):
        self.path = Path(path)
        self.chunk = chunk
        self.top: str | None = None  # "list" or "dict", once the whole file is read
        self.lengths: dict[str | None, int] = {}
        self.kinds: dict[str, str] = {}

    def __iter__(self) -> Iterator[tuple[str | None, list]]:
        pending: list = []
        pending_name: str | None = None
        for name, items in self._items():
            if pending and name != pending_name:
                yield pending_name, pending
                pending = []
            pending_name = name
            pending.extend(items)
            self.lengths[name] = self.lengths.get(name, 0) + len(items)
            if len(pending) >= self.chunk:
                yield pending_name, pending
                pending = []
        if pending:
            yield pending_name, pending

    def _items(self) -> Iterator[tuple[str | None, list]]:  # noqa: C901 (one opcode loop)
        unpack_from = struct.unpack_from
        stack: list = []
        marks: list[int] = []
        lists_seen: set[str | None] = set()
        with open(self.path, "rb") as fh:
            buf, pos = fh.read(_BLOCK), 0
            while True:
                if len(buf) - pos < 16:  # every fixed-size opcode and argument fits in 16 bytes
                    buf, pos = buf[pos:] + fh.read(_BLOCK), 0
                    if not buf:
                        raise UnsupportedPickle("truncated: no STOP opcode")
                op = buf[pos]
                pos += 1
                if op == 0x8C or op == 0x58 or op == 0x8D:  # SHORT_BINUNICODE, BINUNICODE, BINUNICODE8
                    if op == 0x8C:
                        n, pos = buf[pos], pos + 1
                    elif op == 0x58:
                        n, pos = unpack_from("<I", buf, pos)[0], pos + 4
                    else:
                        n, pos = unpack_from("<Q", buf, pos)[0], pos + 8
                    if len(buf) - pos < n:
                        buf, pos = buf[pos:] + fh.read(max(n, _BLOCK)), 0
                        if len(buf) < n:
                            raise UnsupportedPickle("truncated string")
                    stack.append(buf[pos:pos + n].decode("utf-8", "surrogatepass"))
                    pos += n
                elif op == 0x94:  # MEMOIZE (nothing is ever fetched back: GET is refused)
                    pass
                elif op == 0x71:  # BINPUT
                    pos += 1
                elif op == 0x72:  # LONG_BINPUT
                    pos += 4
                elif op == 0x4A:  # BININT
                    stack.append(unpack_from("<i", buf, pos)[0])
                    pos += 4
                elif op == 0x4B:  # BININT1
                    stack.append(buf[pos])
                    pos += 1
                elif op == 0x4D:  # BININT2
                    stack.append(unpack_from("<H", buf, pos)[0])
                    pos += 2
                elif op == 0x8A:  # LONG1
                    n = buf[pos]
                    if len(buf) - pos < 1 + n:
                        buf, pos = buf[pos:] + fh.read(_BLOCK), 0
                        if len(buf) < 1 + n:
                            raise UnsupportedPickle("truncated int")
                    stack.append(int.from_bytes(buf[pos + 1:pos + 1 + n], "little", signed=True))
                    pos += 1 + n
                elif op == 0x28:  # MARK
                    marks.append(len(stack))
                elif op == 0x65:  # APPENDS
                    if not marks:
                        raise UnsupportedPickle("APPENDS without MARK")
                    start = marks.pop()
                    items = stack[start:]
                    del stack[start:]
                    yield self._target_list(stack).name, self._plain(items)
                elif op == 0x61:  # APPEND
                    if not stack:
                        raise UnsupportedPickle("APPEND on an empty stack")
                    item = stack.pop()
                    yield self._target_list(stack).name, self._plain([item])
                elif op == 0x5D:  # EMPTY_LIST
                    name = self._list_name(stack, marks)
                    if name in lists_seen:
                        raise UnsupportedPickle(f"two lists named {name!r}")
                    lists_seen.add(name)
                    self.lengths.setdefault(name, 0)
                    stack.append(_List(name))
                elif op == 0x7D:  # EMPTY_DICT
                    if stack:
                        raise UnsupportedPickle("a dict that is not the pickled object itself")
                    stack.append(_Dict())
                elif op == 0x75 or op == 0x73:  # SETITEMS, SETITEM
                    if op == 0x75:
                        if not marks:
                            raise UnsupportedPickle("SETITEMS without MARK")
                        start = marks.pop()
                    else:
                        start = len(stack) - 2
                    pairs = stack[start:]
                    del stack[start:]
                    if len(stack) != 1 or not isinstance(stack[0], _Dict) or len(pairs) % 2:
                        raise UnsupportedPickle("dict items outside the top-level dict")
                    for key, value in zip(pairs[::2], pairs[1::2]):
                        if not isinstance(key, str) or (isinstance(value, _List) and value.name != key) \
                                or isinstance(value, _Dict):
                            raise UnsupportedPickle("a dict entry that is not str -> list/str/int")
                        self.kinds[key] = "list" if isinstance(value, _List) else type(value).__name__
                elif op == 0x80:  # PROTO
                    if buf[pos] < 2:
                        raise UnsupportedPickle(f"protocol {buf[pos]}")
                    pos += 1
                elif op == 0x95:  # FRAME: its length only; the opcodes follow inline
                    pos += 8
                elif op == 0x2E:  # STOP
                    if len(stack) != 1 or marks or not isinstance(stack[0], (_List, _Dict)):
                        raise UnsupportedPickle("not a list or a dict of lists")
                    self.top = "list" if isinstance(stack[0], _List) else "dict"
                    return
                else:
                    raise UnsupportedPickle(f"opcode {bytes([op])!r}")

    @staticmethod
    def _target_list(stack: list) -> _List:
        if not stack or not isinstance(stack[-1], _List):
            raise UnsupportedPickle("items appended to something other than a list")
        return stack[-1]

    @staticmethod
    def _plain(items: list) -> list:
        for item in items:
            if isinstance(item, (_List, _Dict)):
                raise UnsupportedPickle("a container inside a list")
        return items

    @staticmethod
    def _list_name(stack: list, marks: list[int]) -> str | None:
        """The dict key a new list is the value of (None: the pickled object is the list)."""
        if not stack:
            return None
        base = marks[-1] if marks else 1
        if not (isinstance(stack[0], _Dict) and base >= 1 and all(m >= 1 for m in marks) and len(marks) <= 1
                and (len(stack) - base) % 2 == 1 and isinstance(stack[-1], str)):
            raise UnsupportedPickle("a list that is not a value of the top-level dict")
        return stack[-1]
