"""What a checkpoint file says its tensors will take, read without inflating, unpickling or allocating anything:
the storages a torch pickle declares (found by walking its opcodes) and the tensors a safetensors header lists.
``pfnet.checkpoint`` compares these with its size cap before handing the file to torch or safetensors."""
from __future__ import annotations

import json
import pickletools
import struct
from collections.abc import Iterator
from typing import IO, Any, NamedTuple

# Bytes per element of torch's storage classes (``torch.FloatStorage`` -> "Float"); others count as the widest.
_STORAGE_ITEMSIZE = {"Double": 8, "Float": 4, "Half": 2, "BFloat16": 2, "Long": 8, "Int": 4, "Short": 2, "Char": 1,
                     "Byte": 1, "Bool": 1, "ComplexDouble": 16, "ComplexFloat": 8, "QInt32": 4, "QInt8": 1,
                     "QUInt8": 1, "QUInt4x2": 1, "QUInt2x4": 1, "Untyped": 1}
_SAFETENSORS_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8,
                         "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "C64": 8}
_WIDEST = 16


def pickle_storage_bytes(stream: IO[bytes], pickles: int = 1) -> int:
    """Bytes of the storages declared by up to ``pickles`` pickles read one after another from ``stream``
    (torch's zip holds one, its older format several), each storage key counted once."""
    return pickle_storages(stream, pickles)[0]


def pickle_storages(stream: IO[bytes], pickles: int = 1, max_tensors: int | None = None) -> tuple[int, int]:
    """(bytes of the storages, tensors) the pickles declare: every storage reference counts as a tensor. The walk
    stops once the count passes ``max_tensors`` (the count returned is then ``max_tensors + 1``): a file of a
    million tensors is refused without walking, let alone loading, all of it."""
    records: list[Any] = []
    for _ in range(pickles):
        start = stream.tell()
        for record in _persistent_ids(stream):
            records.append(record)
            if max_tensors is not None and len(records) > max_tensors:
                return _storage_bytes(iter(records)), len(records)
        if stream.tell() == start:
            break
    return _storage_bytes(iter(records)), len(records)


def safetensors_tensor_count(header: bytes) -> int:
    """How many tensors a safetensors header (``header``: the file from its start) lists, at most: occurrences of
    the ``"dtype"`` key, counted without parsing the JSON (a header of a million entries is 77 MB)."""
    (length,) = struct.unpack("<Q", header[:8])
    return header[8:8 + length].count(b'"dtype"')


def safetensors_tensor_bytes(head: bytes) -> int:
    """Bytes of the tensors a safetensors header lists (``head``: the file from its start, header included);
    0 where the header cannot be read (the safetensors library then says why)."""
    (length,) = struct.unpack("<Q", head[:8])
    try:
        table = json.loads(head[8:8 + length])
    except ValueError:
        return 0
    total = 0
    for name, info in table.items() if isinstance(table, dict) else ():
        shape = info.get("shape") if isinstance(info, dict) and name != "__metadata__" else None
        if isinstance(shape, list) and all(isinstance(size, int) and size >= 0 for size in shape):
            numel = 1
            for size in shape:
                numel *= size
            total += numel * _SAFETENSORS_ITEMSIZE.get(info.get("dtype"), _WIDEST)
    return total


class _Global(NamedTuple):
    module: str
    name: str


_MARK = object()  # a MARK on the walked stack
_UNKNOWN = object()  # any value the walk does not follow


def _pop_to_mark(stack: list) -> list:
    for index in range(len(stack) - 1, -1, -1):
        if stack[index] is _MARK:
            items = stack[index + 1:]
            del stack[index:]
            return items
    raise IndexError("no MARK on the stack")


def _persistent_ids(stream: IO[bytes]) -> Iterator[Any]:
    """The persistent ids of one pickle (torch's storage records), found by walking its opcodes with a stack of
    plain values: nothing is imported, built or run. Stops where the pickle stops making sense (torch.load then
    says why); what was found up to there is what torch would have allocated up to there."""
    stack: list = []
    memo: dict = {}
    try:
        for opcode, arg, _ in pickletools.genops(stream):
            name = opcode.name
            if name == "STOP":
                return
            if name == "MARK":
                stack.append(_MARK)
            elif name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
                memo[len(memo) if name == "MEMOIZE" else arg] = stack[-1]
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                stack.append(memo.get(arg, _UNKNOWN))
            elif name == "GLOBAL":  # arg: "module name"
                stack.append(_Global(*arg.split(" ", 1)) if " " in arg else _UNKNOWN)
            elif name == "STACK_GLOBAL":
                qualname, module = stack.pop(), stack.pop()
                both = isinstance(module, str) and isinstance(qualname, str)
                stack.append(_Global(module, qualname) if both else _UNKNOWN)
            elif name == "TUPLE":
                stack.append(tuple(_pop_to_mark(stack)))
            elif name in ("EMPTY_TUPLE", "TUPLE1", "TUPLE2", "TUPLE3"):
                count = {"EMPTY_TUPLE": 0, "TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3}[name]
                if len(stack) < count:
                    return
                items = tuple(stack[len(stack) - count:])
                del stack[len(stack) - count:]
                stack.append(items)
            elif name in ("BINPERSID", "PERSID"):
                yield stack.pop() if name == "BINPERSID" else arg
                stack.append(_UNKNOWN)
            elif opcode.arg is not None and not opcode.stack_before and len(opcode.stack_after) == 1 \
                    and not name.startswith("EXT"):
                stack.append(arg)  # a literal: int, str, bytes, float
            else:
                _follow(opcode, stack)
    except (ValueError, IndexError, EOFError, struct.error, UnicodeDecodeError):
        return


def _follow(opcode: pickletools.OpcodeInfo, stack: list) -> None:
    """Any other opcode: pop what it consumes (up to its MARK), push unknowns for what it leaves."""
    before, count = opcode.stack_before, len(opcode.stack_before)
    if pickletools.markobject in before or (opcode.name == "POP" and stack and stack[-1] is _MARK):
        _pop_to_mark(stack)
        count = before.index(pickletools.markobject) if pickletools.markobject in before else 0
    if count > len(stack):
        raise IndexError("stack underflow")
    del stack[len(stack) - count:]
    stack.extend(_MARK if item is pickletools.markobject else _UNKNOWN for item in opcode.stack_after)


def _storage_bytes(records: Iterator[Any]) -> int:
    """Bytes of the storages in torch's records ``('storage', type, key, location, numel, ...)``, each key once."""
    sizes: dict[Any, int] = {}
    for record in records:
        if not (isinstance(record, tuple) and len(record) >= 5 and record[0] == "storage"):
            continue
        storage_type, key, numel = record[1], record[2], record[4]
        if not isinstance(numel, int) or numel <= 0:
            continue
        kind = storage_type.name if isinstance(storage_type, _Global) else ""
        itemsize = _STORAGE_ITEMSIZE.get(kind[:-len("Storage")], _WIDEST) if kind.endswith("Storage") else _WIDEST
        slot = key if isinstance(key, (str, int)) else object()
        sizes[slot] = max(sizes.get(slot, 0), numel * itemsize)
    return sum(sizes.values())
