"""Lists the GPU code a CUDA shared object or object file carries, as nvcc names it: sm_XY for a
cubin, compute_XY for PTX ("a"/"f" for arch- and family-specific ones), one per line, oldest arch
first. What `cuobjdump --list-elf --list-ptx` tells, for toolkits without cuobjdump; standard
library only.

nvcc puts the device code into the ELF section .nv_fatbin: fat binaries, each a 16-byte header
(magic 0xBA55ED50, version, header size, size of the entries) and entries, each with a header of
its own (kind 1 PTX, 2 ELF; its size; the payload's size; the arch at byte 28; flags at byte 40:
0x100000 "a", 0x200000 "f"), payloads possibly compressed. Only the headers are read.

Usage: python scripts/cuda_images.py FILE.so [--expect "sm_75 ... compute_120"]
(--expect: exit status 1 unless FILE carries exactly those images)
"""
import struct
import sys

FATBIN_MAGIC = 0xBA55ED50
KIND_PTX, KIND_ELF = 1, 2
FLAG_ARCH_SPECIFIC, FLAG_FAMILY_SPECIFIC = 0x100000, 0x200000


def elf_section(data: bytes, name: str) -> bytes | None:
    """The contents of section `name` of a little-endian ELF64 file; None where it has none."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError("not a little-endian ELF64 file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def header(i):  # (name offset, type, offset, size)
        base = shoff + i * shentsize
        name_off, sh_type = struct.unpack_from("<II", data, base)
        offset, size = struct.unpack_from("<QQ", data, base + 0x18)
        return name_off, sh_type, offset, size

    strtab_off = header(shstrndx)[2]
    for i in range(shnum):
        name_off, sh_type, offset, size = header(i)
        start = strtab_off + name_off
        if data[start:data.index(b"\0", start)].decode() == name:
            return None if sh_type == 8 else data[offset:offset + size]  # 8: SHT_NOBITS
    return None


def fatbin_images(fatbins: bytes) -> list[str]:
    """The images of the fat binaries laid end to end in `fatbins` (zero padding between them)."""
    images, pos = set(), 0
    while pos + 16 <= len(fatbins):
        magic, _version, header_size, entries_size = struct.unpack_from("<IHHQ", fatbins, pos)
        if magic == 0:  # alignment padding
            pos += 8
            continue
        if magic != FATBIN_MAGIC:
            raise ValueError(f"no fat binary header at offset {pos} of .nv_fatbin")
        entry, end = pos + header_size, pos + header_size + entries_size
        while entry < end:
            kind, _ver, entry_header, payload = struct.unpack_from("<HHIQ", fatbins, entry)
            arch, = struct.unpack_from("<I", fatbins, entry + 28)
            flags, = struct.unpack_from("<Q", fatbins, entry + 40)
            if kind not in (KIND_PTX, KIND_ELF) or entry_header < 48:
                raise ValueError(f"unknown fat binary entry (kind {kind}, header {entry_header} B) at offset {entry}")
            suffix = "a" if flags & FLAG_ARCH_SPECIFIC else "f" if flags & FLAG_FAMILY_SPECIFIC else ""
            images.add((arch, kind == KIND_PTX, f"{'compute' if kind == KIND_PTX else 'sm'}_{arch}{suffix}"))
            entry += entry_header + payload
        pos = end
    return [name for _, _, name in sorted(images)]


def images(path: str) -> list[str]:
    """The cubins and PTX in the file at `path` (none where it has no .nv_fatbin section)."""
    with open(path, "rb") as f:
        section = elf_section(f.read(), ".nv_fatbin")
    return fatbin_images(section) if section else []


def main(argv):
    if len(argv) not in (1, 3) or (len(argv) == 3 and argv[1] != "--expect"):
        print(__doc__.strip().splitlines()[-2], file=sys.stderr)
        return 2
    found = images(argv[0])
    print("\n".join(found))
    if len(argv) == 3:
        expected = argv[2].split()
        if found != expected:
            print(f"{argv[0]} carries {' '.join(found) or 'no GPU code'}; expected {' '.join(expected)}",
                  file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
