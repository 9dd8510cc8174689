"""What a parquet file's footer announces, read without pyarrow: rows, and per column chunk its
number of values and uncompressed bytes, so that a reader can refuse a file before decoding it.

Why not pyarrow's metadata objects: on a corrupted footer, `RowGroupMetaData.column(i)` can throw
a C++ exception that terminates the process (pyarrow 26, size statistics histogram checks), and a
peer must not be able to kill the coordinator with one flipped byte. This is a small bounded
decoder of Thrift's compact protocol that keeps only the fields named below (parquet.thrift:
FileMetaData, RowGroup, ColumnChunk, ColumnMetaData) and skips the rest. It does not know
schemas, encodings or pages; it raises only `FooterError`.
"""

from __future__ import annotations

from dataclasses import dataclass

MAGIC = b"PAR1"
MAX_FOOTER_BYTES = 1 << 20
MAX_CONTAINER = 1 << 16  # elements of one list or map
MAX_DEPTH = 16


class FooterError(ValueError):
    """The footer is not a well-formed parquet FileMetaData."""


@dataclass(frozen=True)
class ColumnChunk:
    path: tuple[str, ...]
    num_values: int
    uncompressed_bytes: int


@dataclass(frozen=True)
class Footer:
    num_rows: int
    row_group_rows: tuple[int, ...]
    columns: tuple[ColumnChunk, ...]  # every column chunk of every row group

    def values_of(self, top_level: str) -> int:
        """Values (leaf entries, for a list: its items) of a top-level column, over all row groups."""
        return sum(c.num_values for c in self.columns if c.path[:1] == (top_level,))

    @property
    def uncompressed_bytes(self) -> int:
        return sum(c.uncompressed_bytes for c in self.columns)


def read_footer(data: bytes) -> Footer:
    if len(data) < 12 or data[:4] != MAGIC or data[-4:] != MAGIC:
        raise FooterError("not a parquet file (no PAR1 magic at both ends)")
    length = int.from_bytes(data[-8:-4], "little")
    if length > MAX_FOOTER_BYTES or length > len(data) - 12:
        raise FooterError(f"footer length {length} does not fit the file")
    raw = _Compact(data[len(data) - 8 - length : len(data) - 8]).struct(0)
    try:
        num_rows = _int(raw.get(3))
        row_groups = raw.get(4, [])
        groups, columns = [], []
        for group in _list(row_groups):
            groups.append(_int(group.get(3)))
            for chunk in _list(group.get(1, [])):
                meta = chunk.get(3)
                if not isinstance(meta, dict):
                    raise FooterError("column chunk without metadata")
                path = tuple(p.decode("utf-8", "replace") for p in _list(meta.get(3, [])))
                columns.append(ColumnChunk(path, _int(meta.get(5)), _int(meta.get(6))))
    except (AttributeError, TypeError) as e:  # a field of the wrong Thrift type
        raise FooterError(f"malformed footer: {e}") from None
    return Footer(num_rows, tuple(groups), tuple(columns))


def _int(value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise FooterError(f"expected a non-negative integer, got {value!r}")
    return value


def _list(value) -> list:
    if not isinstance(value, list):
        raise FooterError(f"expected a list, got {type(value).__name__}")
    return value


class _Compact:
    """Thrift compact protocol: structs become {field id: value}; bounded in depth and sizes."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def byte(self) -> int:
        if self.pos >= len(self.data):
            raise FooterError("footer ends early")
        self.pos += 1
        return self.data[self.pos - 1]

    def varint(self) -> int:
        value = shift = 0
        while True:
            b = self.byte()
            value |= (b & 0x7F) << shift
            if not b & 0x80:
                return value
            shift += 7
            if shift > 63:
                raise FooterError("varint too long")

    def zigzag(self) -> int:
        n = self.varint()
        return (n >> 1) ^ -(n & 1)

    def value(self, kind: int, depth: int):
        if depth > MAX_DEPTH:
            raise FooterError("footer nested too deeply")
        if kind in (1, 2):  # booleans inside a struct: the type is the value
            return kind == 1
        if kind == 3:
            return self.byte()
        if kind in (4, 5, 6):
            return self.zigzag()
        if kind == 7:
            return self.take(8)
        if kind == 8:
            return self.take(self.varint())
        if kind in (9, 10):
            head = self.byte()
            size, elem = head >> 4, head & 0x0F
            if size == 15:
                size = self.varint()
            self.check_size(size)
            if elem in (1, 2):  # booleans inside a list: one byte each
                return [self.byte() == 1 for _ in range(size)]
            return [self.value(elem, depth + 1) for _ in range(size)]
        if kind == 11:
            size = self.varint()
            self.check_size(size)
            if not size:
                return {}
            types = self.byte()
            return {_key(self.value(types >> 4, depth + 1)): self.value(types & 0x0F, depth + 1)
                    for _ in range(size)}
        if kind == 12:
            return self.struct(depth + 1)
        raise FooterError(f"unknown Thrift type {kind}")

    def struct(self, depth: int) -> dict:
        fields, last = {}, 0
        while True:
            head = self.byte()
            if head == 0:
                return fields
            delta, kind = head >> 4, head & 0x0F
            last = last + delta if delta else self.zigzag()
            fields[last] = self.value(kind, depth)

    def take(self, n: int) -> bytes:
        if n > len(self.data) - self.pos:
            raise FooterError("footer ends early")
        self.pos += n
        return self.data[self.pos - n : self.pos]

    def check_size(self, size: int) -> None:
        if size > MAX_CONTAINER or size > len(self.data) - self.pos:
            raise FooterError(f"container of {size} elements in a footer of {len(self.data)} bytes")


def _key(k):
    return tuple(k) if isinstance(k, list) else k
