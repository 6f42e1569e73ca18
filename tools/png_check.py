#!/usr/bin/env python3
"""tools/png_check.py FILE.png: fails unless FILE is a non-empty 8-bit PNG (RGB or RGBA,
non-interlaced, as gdk_texture_save_to_png writes) whose pixels are not all one colour.
Standard library only: the image data is inflated with zlib and unfiltered row by row."""
import struct
import sys
import zlib


def fail(why):
    print(f"png_check: {sys.argv[1]}: {why}")
    sys.exit(1)


def main():
    try:
        data = open(sys.argv[1], "rb").read()
    except OSError as e:
        fail(f"cannot read it ({e.strerror}): the demo saved no screenshot")
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        fail("not a PNG")
    pos, idat, head = 8, b"", None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            head = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        elif kind == b"IEND":
            break
    if head is None:
        fail("no IHDR")
    width, height, depth, colour, _, _, interlace = head
    channels = {2: 3, 6: 4}.get(colour)
    if depth != 8 or channels is None or interlace != 0:
        fail(f"unsupported: depth {depth}, colour type {colour}, interlace {interlace}")
    if width == 0 or height == 0:
        fail("empty image")
    raw = zlib.decompress(idat)
    stride = width * channels
    prev = bytearray(stride)
    colours = set()
    for y in range(height):
        start = y * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1:start + 1 + stride])
        for i in range(stride):
            a = line[i - channels] if i >= channels else 0
            b = prev[i]
            c = prev[i - channels] if i >= channels else 0
            if kind == 1:
                line[i] = (line[i] + a) & 255
            elif kind == 2:
                line[i] = (line[i] + b) & 255
            elif kind == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
            elif kind != 0:
                fail(f"bad filter type {kind} on row {y}")
        for x in range(0, stride, channels * 7):  # every 7th pixel is plenty to tell
            colours.add(bytes(line[x:x + channels]))
        prev = line
    if len(colours) < 2:
        fail(f"{width}x{height}, every pixel the same colour")
    print(f"png_check: {sys.argv[1]}: {width}x{height}, {len(colours)} colours or more")


main()
