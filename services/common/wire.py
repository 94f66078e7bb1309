"""Finds the field that made a protobuf message undecodable, so errors can name it.

Python protobuf reports only "String field had bad UTF-8" for the whole message; this walks
the wire format against the message descriptor to name the field (e.g. `texts[3]`).
"""

from __future__ import annotations

from google.protobuf.descriptor import Descriptor, FieldDescriptor


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def find_bad_field(descriptor: Descriptor, data: bytes, prefix: str = "") -> str:
    """Path of the first string field with invalid UTF-8 (or a malformed spot) in `data`."""
    counts: dict[str, int] = {}
    pos = 0
    while pos < len(data):
        try:
            key, pos = _varint(data, pos)
        except ValueError:
            return prefix.rstrip(".") or "request"
        number, wire_type = key >> 3, key & 7
        field = descriptor.fields_by_number.get(number)
        name = field.name if field else f"#{number}"
        index = counts.get(name, 0)
        counts[name] = index + 1
        path = prefix + name
        if field is not None and field.is_repeated:
            path += f"[{index}]"
        try:
            if wire_type == 0:
                _, pos = _varint(data, pos)
            elif wire_type == 1:
                pos += 8
            elif wire_type == 5:
                pos += 4
            elif wire_type == 2:
                length, pos = _varint(data, pos)
                chunk = data[pos:pos + length]
                if len(chunk) < length:
                    return path
                pos += length
                if field is not None and field.type == FieldDescriptor.TYPE_STRING:
                    try:
                        chunk.decode("utf-8")
                    except UnicodeDecodeError:
                        return path
                elif field is not None and field.type == FieldDescriptor.TYPE_MESSAGE:
                    inner = find_bad_field(field.message_type, chunk, path + ".")
                    if inner:
                        return inner
            else:
                return path
        except ValueError:
            return path
    return ""
