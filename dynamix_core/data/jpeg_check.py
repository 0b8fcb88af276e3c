"""A strict check of a JPEG stream's structure: libjpeg only warns about corrupt Huffman data (and
decodes it anyway into wrong pixels), and Pillow drops its warnings, so a full decode with Pillow
passes garbage written into the middle of a JPEG. This walks the marker segments and decodes the
Huffman-coded data of every sequential scan symbol by symbol (no IDCT): each scan must hold exactly
its MCUs, every code must be valid, and the data must end at the scan's last byte.

Progressive and arithmetic-coded scans get the marker walk only. A corruption of a few bytes that
happens to decode as valid codes of the same total length cannot be told from image content.
"""

from __future__ import annotations

import functools
import re

_SCAN_END = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_RST = re.compile(rb"\xff[\xd0-\xd7]")
_SOF_HUFFMAN_SEQUENTIAL = {0xC0, 0xC1}
_SOF_OTHER = {0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_LOOKAHEAD = 12


@functools.lru_cache(maxsize=64)
def _huffman_table(counts: bytes, symbols: bytes) -> tuple[dict, dict]:
    """(lookahead, long codes) of one DHT table: ``lookahead[bits]`` for the 9-bit prefix of a short
    code gives (code length, symbol); ``long[(length, code)]`` the symbols of longer codes."""
    short, long_codes, code, k = {}, {}, 0, 0
    for length in range(1, 17):
        for _ in range(counts[length - 1]):
            if code >= 1 << length:
                raise ValueError("Huffman table with more codes than fit their lengths")
            sym = symbols[k]
            k += 1
            if length <= _LOOKAHEAD:
                pad = _LOOKAHEAD - length
                base = code << pad
                for fill in range(1 << pad):
                    short[format(base | fill, f"0{_LOOKAHEAD}b")] = (length, sym)
            else:
                long_codes[format(code, f"0{length}b")] = sym
            code += 1
        code <<= 1
    return short, long_codes


def _decode_segment(bits: str, nbits: int, mcus: int, blocks: list, max_dc: int) -> str | None:
    """Walk ``mcus`` MCUs of Huffman data in ``bits`` ('0'/'1', padded); ``blocks`` per MCU as
    (dc table, ac table) pairs. Why the data is not a valid stream, or None."""
    pos = 0
    for _ in range(mcus):
        for (dc_short, dc_long), (ac_short, ac_long) in blocks:
            hit = dc_short.get(bits[pos:pos + _LOOKAHEAD]) or _long_code(bits, pos, dc_long)
            if hit is None:
                return "bad Huffman code"
            length, size = hit
            if size > max_dc:
                return "bad Huffman code"
            pos += length + size
            k = 1
            while k < 64:
                hit = ac_short.get(bits[pos:pos + _LOOKAHEAD]) or _long_code(bits, pos, ac_long)
                if hit is None:
                    return "bad Huffman code"
                length, rs = hit
                size = rs & 15
                pos += length + size
                if size:
                    k += (rs >> 4) + 1
                elif rs == 0xF0:
                    k += 16
                else:
                    break  # end of block
            if k > 64:
                return "coefficient index past the end of a block"
            if pos > nbits:
                return "premature end of scan data"
    if nbits - pos >= 8:
        return f"{(nbits - pos) // 8} extraneous bytes of scan data"
    return None


def _long_code(bits: str, pos: int, table: dict):
    for length in range(_LOOKAHEAD + 1, 17):
        sym = table.get(bits[pos:pos + length])
        if sym is not None:
            return length, sym
    return None


def jpeg_structure_problem(data: bytes) -> str | None:
    """Why the JPEG ``data`` is not a well-formed stream, or None: every marker segment in bounds,
    and the Huffman-coded data of each sequential scan decodes to exactly its MCUs, ending at its
    last byte."""
    n = len(data)
    pos, frame, tables, restart = 2, None, {}, 0
    while True:
        while pos < n and data[pos] == 0xFF and pos + 1 < n and data[pos + 1] == 0xFF:
            pos += 1
        if pos + 2 > n:
            return "premature end of data: no end-of-image marker"
        if data[pos] != 0xFF:
            return f"corrupt marker structure at byte {pos}"
        marker = data[pos + 1]
        if marker == 0xD9:
            return None if frame is not None else "end-of-image marker before any image data"
        if 0xD0 <= marker <= 0xD7 or marker in (0x01, 0xD8):
            pos += 2
            continue
        if pos + 4 > n:
            return "premature end of data in a marker segment"
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        end = pos + 2 + length
        if length < 2 or end > n:
            return f"marker 0x{marker:02x} segment at byte {pos} runs past the end of the data"
        body = data[pos + 4:end]
        if marker in _SOF_HUFFMAN_SEQUENTIAL or marker in _SOF_OTHER:
            if len(body) < 6 or len(body) < 6 + 3 * body[5]:
                return "corrupt frame header"
            comps = {body[6 + 3 * i]: (body[7 + 3 * i] >> 4, body[7 + 3 * i] & 15) for i in range(body[5])}
            if any(not (1 <= h <= 4 and 1 <= v <= 4) for h, v in comps.values()):
                return "corrupt frame header: bad sampling factors"
            frame = (marker, body[0], int.from_bytes(body[1:3], "big"), int.from_bytes(body[3:5], "big"), comps)
        elif marker == 0xC4:
            p = 0
            while p < len(body):
                if p + 17 > len(body):
                    return "corrupt Huffman table segment"
                counts = body[p + 1:p + 17]
                total = sum(counts)
                if p + 17 + total > len(body):
                    return "corrupt Huffman table segment"
                try:
                    tables[body[p] >> 4, body[p] & 15] = _huffman_table(counts, body[p + 17:p + 17 + total])
                except ValueError as exc:
                    return f"corrupt Huffman table segment: {exc}"
                p += 17 + total
        elif marker == 0xDD:
            if len(body) < 2:
                return "corrupt restart interval segment"
            restart = int.from_bytes(body[:2], "big")
        elif marker == 0xDA:
            if frame is None:
                return "scan before the frame header"
            match = _SCAN_END.search(data, end)
            if match is None:
                return "premature end of data: scan without an end marker"
            scan_end = match.start()
            if frame[0] in _SOF_HUFFMAN_SEQUENTIAL:
                problem = _check_scan(data[end:scan_end], body, frame, tables, restart)
                if problem is not None:
                    return problem
            pos = scan_end
            continue
        pos = end


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _check_scan(raw: bytes, header: bytes, frame, tables: dict, restart: int) -> str | None:
    _, precision, height, width, comps = frame
    if not header or len(header) < 1 + 2 * header[0]:
        return "corrupt scan header"
    hmax = max(h for h, _ in comps.values())
    vmax = max(v for _, v in comps.values())
    blocks = []
    for i in range(header[0]):
        cid, sel = header[1 + 2 * i], header[2 + 2 * i]
        if cid not in comps:
            return f"scan names component {cid}, not in the frame"
        dc, ac = tables.get((0, sel >> 4)), tables.get((1, sel & 15))
        if dc is None or ac is None:
            return "scan uses a Huffman table that was not defined"
        h, v = comps[cid]
        blocks.append((h, v, dc, ac))
    if len(blocks) == 1:
        h, v, dc, ac = blocks[0]
        mcus = _ceil(_ceil(width * h, hmax), 8) * _ceil(_ceil(height * v, vmax), 8)
        per_mcu = [(dc, ac)]
    else:
        mcus = _ceil(width, 8 * hmax) * _ceil(height, 8 * vmax)
        per_mcu = [(dc, ac) for h, v, dc, ac in blocks for _ in range(h * v)]
    if height == 0:
        return "image height 0 in the frame header (DNL marker not supported)"
    segments = _RST.split(raw) if restart else [raw]
    expected = _ceil(mcus, restart) if restart else 1
    if len(segments) != expected:
        return f"{len(segments)} restart intervals in a scan that has {expected}"
    max_dc = 11 if precision == 8 else 15
    for i, segment in enumerate(segments):
        count = min(restart, mcus - i * restart) if restart else mcus
        segment = segment.replace(b"\xff\x00", b"\xff")
        nbits = 8 * len(segment)
        bits = (format(int.from_bytes(segment, "big"), f"0{nbits}b") if segment else "") + "1" * 40
        problem = _decode_segment(bits, nbits, count, per_mcu, max_dc)
        if problem is not None:
            return problem
    return None
