"""Read what a pickle would do without doing it: the globals it names and the storages it declares.

`pickletools.genops` only decodes opcodes; a small stack model on top of it recovers the names of
STACK_GLOBAL (protocol 4+) and the persistent-id tuples torch uses for tensor storages. Nothing is
imported or called, so this is safe on any file and runs before torch sees it.
"""

from __future__ import annotations

import _compat_pickle
import pickletools
from dataclasses import dataclass, field
from typing import IO, Any

MAX_OPCODES = 20_000_000  # a state dict + optimizer state is ~50 opcodes per tensor


class PickleTooLarge(ValueError):
    """More opcodes than any checkpoint needs."""


class _Opaque:
    """A stack value this model does not track (an object pickle would build)."""


_OPAQUE = _Opaque()


@dataclass(frozen=True)
class Global:
    name: str  # "module.qualname", or "?" when the operands are not plain strings


@dataclass
class Scan:
    globals: list[str] = field(default_factory=list)  # in order of first use
    storages: list[tuple[str, int]] = field(default_factory=list)  # (storage type, element count)
    opcodes: int = 0


def scan(stream: IO[bytes], scan_into: Scan | None = None, max_opcodes: int | None = None) -> Scan:
    """Walk one pickle in `stream` (stopping after its STOP) and report what it references."""
    result = scan_into or Scan()
    max_opcodes = max_opcodes or MAX_OPCODES
    stack: list[Any] = []
    marks: list[list[Any]] = []
    memo: dict[int, Any] = {}
    for opcode, arg, _ in pickletools.genops(stream):
        result.opcodes += 1
        if result.opcodes > max_opcodes:
            raise PickleTooLarge(f"more than {max_opcodes:,} pickle opcodes")
        name = opcode.name
        if name in ("GLOBAL", "INST"):
            _use(result, stack, marks, name, Global(_python3_name(*arg.split(" ", 1))))
        elif name == "STACK_GLOBAL":
            qualname, module = stack.pop(), stack.pop()
            ok = isinstance(module, str) and isinstance(qualname, str)
            _use(result, stack, marks, name, Global(f"{module}.{qualname}" if ok else "?"))
        elif name == "MARK":
            marks.append(stack)
            stack = []
        elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[arg] = stack[-1]
        elif name == "MEMOIZE":
            memo[len(memo)] = stack[-1]
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            stack.append(memo.get(arg, _OPAQUE))
        elif name == "TUPLE":
            items, stack = stack, marks.pop()
            stack.append(tuple(items))
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            size = int(name[-1])
            items = tuple(stack[-size:])
            del stack[-size:]
            stack.append(items)
        elif name == "EMPTY_TUPLE":
            stack.append(())
        elif name == "BINPERSID":
            _record_storage(result, stack.pop())
            stack.append(_OPAQUE)
        elif name == "PERSID":  # text persistent ids are not torch's: an unknown storage
            result.storages.append(("?", -1))
            stack.append(_OPAQUE)
        elif name in ("EXT1", "EXT2", "EXT4"):  # a global looked up in copyreg's extension registry
            _use(result, stack, marks, name, Global(f"copyreg extension {arg}"))
        elif name == "STOP":
            break
        elif _pushes_literal(opcode):
            stack.append(arg)
        else:
            stack = _generic(opcode, stack, marks)
    return result


def _python3_name(module: str, name: str) -> str:
    """The name Python 3 resolves a text global to (protocol 2 pickles say `__builtin__.set`)."""
    module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
    return f"{_compat_pickle.IMPORT_MAPPING.get(module, module)}.{name}"


def _use(result: Scan, stack: list[Any], marks: list[list[Any]], opname: str, ref: Global) -> None:
    if ref.name not in result.globals:
        result.globals.append(ref.name)
    if opname == "INST":  # INST also pops a marked argument list and builds the object
        stack[:] = marks.pop()
    stack.append(ref)


def _pushes_literal(opcode: pickletools.OpcodeInfo) -> bool:
    """Ops that push their decoded argument (ints, floats, strings, bytes) and nothing else."""
    return opcode.arg is not None and not opcode.stack_before and len(opcode.stack_after) == 1 and opcode.name not in (
        "GLOBAL", "INST", "PERSID", "GET", "BINGET", "LONG_BINGET", "EXT1", "EXT2", "EXT4"
    )


def _generic(opcode: pickletools.OpcodeInfo, stack: list[Any], marks: list[list[Any]]) -> list[Any]:
    """Pop and push as many values as the opcode's documented stack effect, values untracked."""
    before = opcode.stack_before
    if pickletools.markobject in before:
        stack = marks.pop()
        before = before[: before.index(pickletools.markobject)]
    if before:
        del stack[-len(before):]
    stack.extend(_OPAQUE for _ in opcode.stack_after)
    return stack


def _record_storage(result: Scan, pid: Any) -> None:
    """torch's storage ids: ('storage', storage type, key, location, element count, ...)."""
    if isinstance(pid, tuple) and len(pid) >= 5 and pid[0] in ("storage", b"storage"):
        kind = pid[1].name if isinstance(pid[1], Global) else "?"
        count = pid[4] if isinstance(pid[4], int) and not isinstance(pid[4], bool) else -1
        result.storages.append((kind, count))
    else:
        result.storages.append(("?", -1))
