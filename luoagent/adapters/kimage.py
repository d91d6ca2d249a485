"""What a kernel image says about itself: its embedded configuration (IKCONFIG) and the LUO/KHO
ABI compatible strings compiled into it, read from the decompressed x86 bzImage payload.

No policy here: the landing-side preflight (workflows/landing.py) decides what to accept."""

from __future__ import annotations

import bz2
import gzip
import lzma
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from luoagent import errors
from luoagent.log import get_logger

log = get_logger(__name__)

#: ABI compatible strings the next kernel must understand, by what they version
#: (include/linux/kho/abi/: LUO_ABI_COMPATIBLE, MEMFD_LUO_FH_COMPATIBLE, KHO_FDT_COMPATIBLE)
ABI_PREFIXES = ("luo", "memfd", "kho")
#: markers around the gzip'd .config that CONFIG_IKCONFIG embeds (kernel/configs.c)
_IKCFG_START, _IKCFG_END = b"IKCFG_ST", b"IKCFG_ED"
#: bytes that may not precede an ABI string (it would be part of a longer identifier)
_WORD = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
_MAGICS = (
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x1f\x8b", "gzip"),
    (b"BZh", "bzip2"),
    (b"\x5d\x00\x00", "lzma"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"\x02\x21\x4c\x18", "lz4"),
    (b"\x89LZO", "lzo"),
)


@dataclass
class KernelImage:
    """The facts one image carries. ``config`` is None when the image embeds none;
    ``abi`` maps each of ABI_PREFIXES found to its string (absent: not compiled in);
    ``problem`` says why the payload could not be read (then config and abi are unknown)."""

    path: Path
    config: dict[str, str] | None = None
    abi: dict[str, str] = field(default_factory=dict)
    ambiguous: dict[str, list[str]] = field(default_factory=dict)
    compression: str = ""
    problem: str = ""


def _payload(data: bytes) -> bytes:
    """The compressed kernel inside an x86 bzImage (boot protocol >= 2.08: payload_offset at
    0x248 and payload_length at 0x24C, from the start of the protected-mode code, which
    follows setup_sects (0x1F1; 0 means 4) + 1 sectors; Documentation/arch/x86/boot.rst)."""
    if len(data) < 0x250 or data[0x202:0x206] != b"HdrS":
        raise errors.KexecImageError("not an x86 bzImage (no 'HdrS' boot header)")
    if int.from_bytes(data[0x206:0x208], "little") < 0x208:
        raise errors.KexecImageError("boot protocol older than 2.08: the image has no payload pointer")
    setup_sects = data[0x1F1] or 4
    start = (setup_sects + 1) * 512 + int.from_bytes(data[0x248:0x24C], "little")
    length = int.from_bytes(data[0x24C:0x250], "little")
    payload = data[start:start + length]
    if len(payload) != length or not length:
        raise errors.KexecImageError(f"payload at {start:#x} (+{length}) is outside the file")
    return payload


def _decompress(payload: bytes) -> tuple[str, bytes]:
    for magic, kind in _MAGICS:
        if payload.startswith(magic):
            break
    else:
        raise errors.KexecImageError(f"unknown payload compression (magic {payload[:6].hex()})")
    try:
        if kind == "xz":
            return kind, lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
        if kind == "lzma":
            return kind, lzma.LZMADecompressor(format=lzma.FORMAT_ALONE).decompress(payload)
        if kind == "gzip":
            return kind, zlib.decompressobj(wbits=31).decompress(payload)
        if kind == "bzip2":
            return kind, bz2.BZ2Decompressor().decompress(payload)
    except (lzma.LZMAError, zlib.error, OSError, EOFError) as exc:
        raise errors.KexecImageError(f"{kind} payload does not decompress: {exc}") from None
    # zstd, lz4, lzo: Python's standard library has no decoder for them
    raise errors.KexecImageError(f"{kind}-compressed payload: no decoder in this Python")


def parse_config(text: str) -> dict[str, str]:
    """``CONFIG_X=v`` lines -> {X: v}; ``# CONFIG_X is not set`` -> {X: "n"}."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        m = re.match(r"^CONFIG_([A-Za-z0-9_]+)=(.*)$", line)
        if m:
            out[m.group(1)] = m.group(2)
            continue
        m = re.match(r"^# CONFIG_([A-Za-z0-9_]+) is not set$", line)
        if m:
            out[m.group(1)] = "n"
    return out


def _abi_strings(vmlinux: bytes, prefix: str) -> set[str]:
    """Every NUL-terminated ``PREFIX-vN`` not preceded by an identifier byte. bytes.find, not a
    regex with look-behind: a regex scan of a 15 MB kernel took 1.5 s on the host and ~40 s in
    the nested lab VM, where the landing preflight runs it on two images."""
    needle = prefix.encode() + b"-v"
    found: set[str] = set()
    at = vmlinux.find(needle)
    while at >= 0:
        end = at + len(needle)
        digits_end = end
        while digits_end < len(vmlinux) and 0x30 <= vmlinux[digits_end] <= 0x39:
            digits_end += 1
        if (digits_end > end and digits_end < len(vmlinux) and vmlinux[digits_end] == 0
                and (at == 0 or vmlinux[at - 1] not in _WORD)):
            found.add(vmlinux[at:digits_end].decode())
        at = vmlinux.find(needle, end)
    return found


def read_vmlinux_facts(vmlinux: bytes, path: Path, compression: str = "") -> KernelImage:
    """IKCONFIG and ABI strings out of an uncompressed kernel."""
    img = KernelImage(path=path, compression=compression)
    start = vmlinux.find(_IKCFG_START)
    end = vmlinux.find(_IKCFG_END, start + 1) if start >= 0 else -1
    if start >= 0 and end > start:
        try:
            img.config = parse_config(gzip.decompress(vmlinux[start + len(_IKCFG_START):end]).decode(errors="replace"))
        except (OSError, EOFError, zlib.error):
            img.config = None  # a stray marker, not a config blob
    for prefix in ABI_PREFIXES:
        found = sorted(_abi_strings(vmlinux, prefix))
        if len(found) == 1:
            img.abi[prefix] = found[0]
        elif found:
            img.ambiguous[prefix] = found
    return img


def inspect(path: Path) -> KernelImage:
    """Read ``path``'s payload; a payload that cannot be read gives a KernelImage with
    ``problem`` set (the caller decides), a file that cannot be read raises KexecImageError."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise errors.KexecImageError(f"cannot read kernel image {path}: {exc.strerror}") from None
    try:
        kind, vmlinux = _decompress(_payload(data))
    except errors.KexecImageError as exc:
        return KernelImage(path=Path(path), problem=str(exc))
    img = read_vmlinux_facts(vmlinux, Path(path), kind)
    log.debug("kimage.inspect", path=str(path), compression=kind, vmlinux_bytes=len(vmlinux),
              ikconfig=img.config is not None, abi=img.abi)
    return img


def config_beside(path: Path, release: str) -> tuple[Path, dict[str, str]] | None:
    """A configuration file next to the image: ``config-RELEASE`` (Debian's /boot layout),
    else a lone ``config`` (a build directory, the lab's kernel cache)."""
    d = Path(path).parent
    for name in ([f"config-{release}"] if release else []) + ["config"]:
        cand = d / name
        if cand.is_file():
            try:
                return cand, parse_config(cand.read_text(errors="replace"))
            except OSError:
                continue
    return None
