"""Struct layouts from BTF, the kernel's own type information.

The tracefs capture script dereferences kernel structs with fixed offsets
(``+48($arg1)``); those offsets move between kernels (Android GKI adds fields
and ABI padding). Every kernel built with CONFIG_DEBUG_INFO_BTF describes its
own layout in ``/sys/kernel/btf/vmlinux``, which GKI kernels ship, so the
offsets are read from there. Only what the script needs is parsed: named
structs, their members (through nested structs and typedefs) and their sizes.
Format: Documentation/bpf/btf.rst.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

BTF_MAGIC = 0xEB9F
SYS_BTF = "/sys/kernel/btf/vmlinux"

# BTF_KIND_*: how many bytes of extra data follow each type's 12-byte header
_INT, _PTR, _ARRAY, _STRUCT, _UNION, _ENUM, _FWD, _TYPEDEF, _VOLATILE, _CONST, _RESTRICT = range(1, 12)
_FUNC, _FUNC_PROTO, _VAR, _DATASEC, _FLOAT, _DECL_TAG, _TYPE_TAG, _ENUM64 = range(12, 20)
_MODIFIERS = {_TYPEDEF, _VOLATILE, _CONST, _RESTRICT, _TYPE_TAG}


class BTFError(Exception):
    """The file is not BTF this reader understands; str() says why in one line."""


@dataclass(frozen=True)
class Member:
    name: str
    type_id: int
    bit_offset: int


class BTF:
    def __init__(self, blob: bytes, source: str = "BTF"):
        self.source = source
        try:
            self._read(blob)
        except (struct.error, IndexError, ValueError, OverflowError) as e:  # offsets outside the blob
            raise BTFError(f"{source}: malformed BTF ({e})") from None

    def _read(self, blob: bytes) -> None:
        source = self.source
        if len(blob) < 24:
            raise BTFError(f"{source}: too short to be BTF")
        magic = struct.unpack_from("<H", blob)[0]
        endian = "<" if magic == BTF_MAGIC else ">"
        if struct.unpack_from(endian + "H", blob)[0] != BTF_MAGIC:
            raise BTFError(f"{source}: no BTF magic (0x{magic:04x})")
        hdr_len, type_off, type_len, str_off, str_len = struct.unpack_from(endian + "I4I", blob, 4)
        if max(hdr_len + type_off + type_len, hdr_len + str_off + str_len) > len(blob):
            raise BTFError(f"{source}: malformed BTF (its sections run past its {len(blob)} bytes)")
        types = blob[hdr_len + type_off:hdr_len + type_off + type_len]
        self._strings = blob[hdr_len + str_off:hdr_len + str_off + str_len]
        self._e = endian
        # type id -> (kind, name, size_or_type, members); id 0 is void
        self._types: list[tuple[int, str, int, tuple[Member, ...]]] = [(0, "", 0, ())]
        self._structs: dict[str, int] = {}
        self._parse(types)

    @classmethod
    def from_file(cls, path: str) -> "BTF":
        """Raw BTF (``/sys/kernel/btf/vmlinux``) or an ELF vmlinux with a .BTF section."""
        try:
            with open(path, "rb") as f:
                blob = f.read()
        except OSError as e:
            raise BTFError(f"{path}: {e.strerror or e}") from None
        if blob[:4] == b"\x7fELF":
            try:
                blob = _elf_section(blob, ".BTF", path)
            except (struct.error, IndexError, ValueError, OverflowError) as e:  # offsets outside the file
                raise BTFError(f"{path}: malformed ELF ({e})") from None
        return cls(blob, path)

    def _name(self, off: int) -> str:
        end = self._strings.index(b"\0", off)
        return self._strings[off:end].decode()

    def _parse(self, data: bytes) -> None:
        e, pos = self._e, 0
        while pos < len(data):
            name_off, info, size_type = struct.unpack_from(e + "3I", data, pos)
            pos += 12
            kind, vlen, kind_flag = info >> 24 & 0x1F, info & 0xFFFF, info >> 31
            members: tuple[Member, ...] = ()
            if kind in (_STRUCT, _UNION):
                out = []
                for _ in range(vlen):
                    m_name, m_type, m_off = struct.unpack_from(e + "3I", data, pos)
                    pos += 12
                    # kind_flag: the low 24 bits are the offset, the high 8 a bitfield size
                    out.append(Member(self._name(m_name), m_type, m_off & 0xFFFFFF if kind_flag else m_off))
                members = tuple(out)
            elif kind in (_INT, _VAR, _DECL_TAG):
                pos += 4
            elif kind == _ARRAY:
                pos += 12
            elif kind in (_ENUM, _FUNC_PROTO, _DATASEC):
                pos += vlen * (8 if kind != _DATASEC else 12)
            elif kind == _ENUM64:
                pos += vlen * 12
            elif kind not in (_PTR, _FWD, _FUNC, _FLOAT) and kind not in _MODIFIERS:
                raise BTFError(f"{self.source}: unknown BTF kind {kind}")
            name = self._name(name_off)
            if kind == _STRUCT and name and members:  # a forward-declared twin has no members
                self._structs.setdefault(name, len(self._types))
            self._types.append((kind, name, size_type, members))

    def _resolve(self, type_id: int) -> int:
        while self._types[type_id][0] in _MODIFIERS:
            type_id = self._types[type_id][2]
        return type_id

    def struct_size(self, name: str) -> int:
        return self._types[self._struct(name)][2]

    def _struct(self, name: str) -> int:
        try:
            return self._structs[name]
        except KeyError:
            raise BTFError(f"{self.source}: no struct {name}") from None

    def offset(self, struct_name: str, path: str) -> int:
        """Byte offset of ``path`` ("ll_ops.keyslot_program") in struct ``struct_name``.
        Members of anonymous unions and structs are found as the C compiler finds them."""
        type_id, total = self._struct(struct_name), 0
        for part in path.split("."):
            found = self._find(type_id, part)
            if found is None:
                raise BTFError(f"{self.source}: struct {struct_name} has no member {path}")
            bits, type_id = found
            total += bits
            type_id = self._resolve(type_id)
        if total % 8:
            raise BTFError(f"{self.source}: {struct_name}.{path} is a bitfield")
        return total // 8

    def _find(self, type_id: int, name: str) -> tuple[int, int] | None:
        for m in self._types[type_id][3]:
            if m.name == name:
                return m.bit_offset, m.type_id
            if not m.name:  # anonymous union or struct: its members are the parent's
                inner = self._find(self._resolve(m.type_id), name)
                if inner is not None:
                    return m.bit_offset + inner[0], inner[1]
        return None

    def has_struct(self, name: str) -> bool:
        return name in self._structs


def _elf_section(blob: bytes, wanted: str, path: str) -> bytes:
    """One section of a 64-bit little-endian ELF file (a vmlinux)."""
    if blob[4] != 2 or blob[5] != 1:
        raise BTFError(f"{path}: only 64-bit little-endian ELF is read")
    shoff, = struct.unpack_from("<Q", blob, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<3H", blob, 0x3A)
    sections = [struct.unpack_from("<IIQQQQ", blob, shoff + i * shentsize) for i in range(shnum)]
    if shstrndx >= len(sections):
        raise BTFError(f"{path}: no {wanted} section (no section names)")
    names_off = sections[shstrndx][4]
    for name_off, _type, _flags, _addr, offset, size in sections:
        end = blob.index(b"\0", names_off + name_off)
        if blob[names_off + name_off:end].decode() == wanted:
            return blob[offset:offset + size]
    raise BTFError(f"{path}: no {wanted} section (kernel built without CONFIG_DEBUG_INFO_BTF?)")
