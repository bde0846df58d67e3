"""Gantt pictures of a simulated iteration: PNG (numpy raster, zlib + struct, a 5x7 bitmap font;
no plotting library) and a self-contained HTML/SVG page with hover details.

One band per pipeline stage: the compute row (F, B, I, W, R, optimizer, micro-batch numbers in
the bars; a model chunk's second and later virtual stages are drawn lighter) over the
communication row (sends, gradient reduction, parameter gathers).  A black line on top of a bar
marks the critical path."""

import functools
import struct
import zlib
from html import escape

import numpy as np

COLORS = {"F": (76, 120, 168), "B": (84, 162, 75), "I": (84, 162, 75), "W": (114, 183, 178),
          "R": (245, 133, 24), "optimizer": (228, 87, 86), "send": (150, 150, 150),
          "grad_sync": (178, 121, 162), "gather": (238, 202, 59), "param_sync": (238, 202, 59)}
LEGEND = [("F", "forward"), ("B", "backward"), ("W", "weight grad"), ("R", "recompute"),
          ("optimizer", "optimizer"), ("send", "p2p send"), ("grad_sync", "dp grad sync"),
          ("gather", "param gather")]
# 5x7 glyphs, one hex byte per row (low 5 bits, MSB left), after the HD44780 character ROM
GLYPHS = {
    "0": "0E11131519110E", "1": "040C040404040E", "2": "0E11010204081F",
    "3": "1F02040201110E", "4": "02060A121F0202", "5": "1F101E0101110E",
    "6": "0608101E11110E", "7": "1F010204080808", "8": "0E11110E11110E", "9": "0E11110F01020C",
    "A": "0E1111111F1111", "B": "1E11111E11111E", "C": "0E11101010110E", "D": "1C12111111121C",
    "E": "1F10101E10101F", "F": "1F10101E101010", "G": "0E11101711110F",
    "H": "1111111F111111", "I": "0E04040404040E", "J": "0702020202120C", "K": "11121418141211",
    "L": "1010101010101F", "M": "111B1515111111", "N": "11111915131111", "O": "0E11111111110E",
    "P": "1E11111E101010", "Q": "0E11111115120D", "R": "1E11111E141211", "S": "0F10100E01011E",
    "T": "1F040404040404", "U": "1111111111110E", "V": "11111111110A04",
    "W": "1111111515150A", "X": "11110A040A1111", "Y": "1111110A040404", "Z": "1F01020408101F",
    " ": "00000000000000", ".": "00000000000C0C", "%": "18190204081303", "=": "00001F001F0000",
    "-": "0000001F000000", ":": "000C0C000C0C00", "/": "00010204081000", "(": "02040808080402",
    ")": "08040202020408", ",": "000000000C0408", "_": "0000000000001F", "+": "0004041F040400",
}
LABEL_W, ROW_H, COMM_H, GAP, TOP, PLOT_W = 96, 26, 12, 8, 34, 1400


@functools.lru_cache(maxsize=None)
def _glyph_pixels(ch: str, scale: int) -> tuple:
    """(rows, cols) of the set pixels of one character at `scale`."""
    rows = GLYPHS.get(ch.upper(), GLYPHS[" "])
    bits = [int(rows[i:i + 2], 16) for i in range(0, 14, 2)]
    mask = np.array([[(b >> (4 - k)) & 1 for k in range(5)] for b in bits], dtype=bool)
    return np.nonzero(np.kron(mask, np.ones((scale, scale), dtype=bool)))


def text_width(s: str, scale: int = 1) -> int:
    return 6 * scale * len(s) - scale


def draw_text(img: np.ndarray, x: int, y: int, s: str, color=(0, 0, 0), scale: int = 1) -> None:
    """Write `s` with its top-left corner at (x, y), clipped to the image."""
    h, w, _ = img.shape
    for i, ch in enumerate(s):
        ys, xs = _glyph_pixels(ch, scale)
        ys, xs = ys + y, xs + x + 6 * scale * i
        keep = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
        img[ys[keep], xs[keep]] = color


def png_bytes(img: np.ndarray) -> bytes:
    """An 8-bit RGB PNG (ISO/IEC 15948: signature, IHDR, one zlib IDAT, IEND)."""
    h, w, _ = img.shape
    raw = np.concatenate([np.zeros((h, 1), np.uint8), img.reshape(h, 3 * w)], axis=1)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + \
            struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw.tobytes(), 6)) + chunk(b"IEND", b""))


def _unit(step_s: float) -> tuple:
    return (1.0, "s") if step_s >= 2 else (1e3, "ms") if step_s >= 2e-3 else (1e6, "us")


def _color(e, pp: int) -> tuple:
    return _shade(e.kind, e.stage >= pp and e.kind in ("F", "B", "I", "W", "R"))


@functools.lru_cache(maxsize=None)
def _shade(kind: str, lighter: bool) -> tuple:
    """The kind's colour; lighter for a rank's later virtual stages."""
    return tuple(int(c + (255 - c) * 0.45) if lighter else c for c in COLORS[kind])


def _row_y(rank: int, stream: str) -> tuple:
    y = TOP + rank * (ROW_H + COMM_H + GAP)
    return (y, ROW_H) if stream == "compute" else (y + ROW_H + 1, COMM_H - 1)


def _x(t: float, step_s: float) -> float:
    return LABEL_W + t / step_s * PLOT_W


def title_of(t) -> str:
    scale, unit = _unit(t.step_s)
    return (f"{t.schedule} pp={t.pp} v={t.virtual_stages} m={t.num_microbatches}  "
            f"step {t.step_s * scale:.4g} {unit}  bubble {100 * t.bubble_fraction:.1f}%")


def timeline_png(t, title: str = "") -> bytes:
    height = TOP + t.pp * (ROW_H + COMM_H + GAP) + 70
    img = np.full((height, LABEL_W + PLOT_W + 20, 3), 255, dtype=np.uint8)
    draw_text(img, 8, 8, title or title_of(t), scale=2)
    for r in range(t.pp):
        y, h = _row_y(r, "compute")
        draw_text(img, 8, y + 9, f"stage {r}")
        draw_text(img, 8, y + h + 2, "comm", color=(110, 110, 110))
        img[y + h, LABEL_W:LABEL_W + PLOT_W] = (225, 225, 225)
    for e in t.events:
        _draw_event(img, e, t)
    _draw_axis(img, t, TOP + t.pp * (ROW_H + COMM_H + GAP))
    return png_bytes(img)


def _draw_event(img: np.ndarray, e, t) -> None:
    y, h = _row_y(e.rank, e.stream)
    x0, x1 = _x(e.start_s, t.step_s), _x(e.end_s, t.step_s)
    a, b = int(round(x0)), max(int(round(x1)), int(round(x0)) + 1)
    if e.end_s == e.start_s:
        return
    img[y:y + h, a:b] = _color(e, t.pp)
    if b - a >= 3:
        img[y:y + h, b - 1] = 255  # a white seam between neighbouring bars
    if e.critical:
        img[y:y + 2, a:b] = 0
    label = str(e.mb) if e.mb >= 0 else ("OPT" if e.kind == "optimizer" else "")
    if e.stream == "compute" and label:
        scale = 2 if text_width(label, 2) + 4 <= b - a else 1
        if text_width(label, scale) + 2 <= b - a:
            draw_text(img, (a + b - text_width(label, scale)) // 2, y + (h - 7 * scale) // 2 + 1,
                      label, color=(255, 255, 255), scale=scale)


def _draw_axis(img: np.ndarray, t, y: int) -> None:
    scale, unit = _unit(t.step_s)
    img[y, LABEL_W:LABEL_W + PLOT_W] = 0
    step = _nice_step(t.step_s * scale / 8)
    k = 0
    while k * step <= t.step_s * scale * 1.0001:
        x = int(round(_x(k * step / scale, t.step_s)))
        img[y:y + 5, x] = 0
        label = f"{k * step:g}"
        draw_text(img, x - text_width(label) // 2, y + 8, label)
        k += 1
    draw_text(img, LABEL_W + PLOT_W - text_width(unit) - 4, y + 20, unit)
    x = LABEL_W
    for kind, name in LEGEND:
        img[y + 36:y + 46, x:x + 14] = COLORS[kind]
        draw_text(img, x + 18, y + 38, name)
        x += 18 + text_width(name) + 18
    draw_text(img, x, y + 38, "black top line: critical path", color=(60, 60, 60))


def _nice_step(raw: float) -> float:
    mag = 10 ** np.floor(np.log10(raw)) if raw > 0 else 1.0
    return float(next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw))


def timeline_html(t, title: str = "") -> str:
    """A standalone HTML page with an SVG Gantt chart; hover a bar for its details."""
    scale, unit = _unit(t.step_s)
    height = TOP + t.pp * (ROW_H + COMM_H + GAP) + 40
    out = [f'<!doctype html><meta charset="utf-8"><title>{escape(title or title_of(t))}</title>',
           f'<h3 style="font-family:sans-serif">{escape(title or title_of(t))}</h3>',
           f'<svg xmlns="http://www.w3.org/2000/svg" width="{LABEL_W + PLOT_W + 20}" '
           f'height="{height}" font-family="sans-serif" font-size="11">']
    for r in range(t.pp):
        y, _ = _row_y(r, "compute")
        out.append(f'<text x="6" y="{y + 17}">stage {r}</text>')
    for e in t.events:
        if e.end_s > e.start_s:
            out.append(_svg_rect(e, t, scale, unit))
    out.append("</svg>")
    out.append('<p style="font-family:sans-serif">' + " ".join(
        f'<span style="background:rgb{COLORS[k]};padding:0 8px">&nbsp;</span> {n}'
        for k, n in LEGEND) + "; black outline: critical path</p>")
    return "\n".join(out) + "\n"


def _svg_rect(e, t, scale: float, unit: str) -> str:
    y, h = _row_y(e.rank, e.stream)
    x0, x1 = _x(e.start_s, t.step_s), _x(e.end_s, t.step_s)
    tip = (f"{e.kind} stage {e.stage} mb {e.mb}: {e.start_s * scale:.4g}-"
           f"{e.end_s * scale:.4g} {unit}{' (critical)' if e.critical else ''}")
    stroke = ' stroke="black"' if e.critical else ""
    rect = (f'<rect x="{x0:.2f}" y="{y}" width="{max(x1 - x0, 0.5):.2f}" height="{h}" '
            f'fill="rgb{_color(e, t.pp)}"{stroke}><title>{escape(tip)}</title></rect>')
    if e.stream == "compute" and e.mb >= 0 and x1 - x0 >= 8 * len(str(e.mb)):
        rect += (f'<text x="{(x0 + x1) / 2:.2f}" y="{y + h / 2 + 4}" fill="white" '
                 f'text-anchor="middle">{e.mb}</text>')
    return rect
