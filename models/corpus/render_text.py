"""Offline rendering of the text images OCR and document entries read: lines, captchas, scenes, pages, tables.

Everything is drawn with Pillow from a seeded ``numpy`` generator, so a seed gives the same images wherever the same
fonts are installed. Fonts are the DejaVu faces matplotlib ships (``matplotlib.get_data_path()/fonts/ttf``); without
matplotlib, Pillow's built-in scalable font is used (fewer faces, same code path).
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

Color = tuple[int, int, int]
Box = tuple[int, int, int, int]  # x1, y1, x2, y2

# Common words, so that lines read like invoices, forms and prose rather than random strings.
_WORDS = (
    "the of and to in is for on that with as by from at this are be or an was it not have has which all "
    "will can more one new other about time year data report total page order date name number address "
    "phone email account invoice amount price payment balance due tax customer service product item "
    "quantity unit model system value section table figure chapter note summary result method sample "
    "test level rate change average office city state north south east west street road avenue building "
    "floor room center house market bank water energy power light speed network server client request "
    "response memory storage device battery morning evening monday tuesday friday january march april "
    "june august october december weekly monthly annual first second third last next previous final "
    "early late open closed public private local global general quick brown fox jumps over lazy dog "
    "hello world welcome thank please contact support information details"
)
_VIETNAMESE = (
    "và của có không được là cho những một người trong này với các đã để khi đến nhà nước việt nam "
    "thành phố hà nội công ty hóa đơn số tiền ngày tháng năm địa chỉ điện thoại khách hàng sản phẩm "
    "giá bán tổng cộng thuế học sinh giáo viên trường đại bệnh viện ngân chợ đường xin cảm ơn chào "
    "mừng quý"
)
WORDS: tuple[str, ...] = tuple(_WORDS.split())
VIETNAMESE: tuple[str, ...] = tuple(_VIETNAMESE.split())
CAPTCHA_CHARS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@functools.cache
def font_paths() -> tuple[str, ...]:
    """The DejaVu faces shipped with matplotlib (empty when matplotlib is absent)."""
    spec = importlib.util.find_spec("matplotlib")  # found, not imported: importing matplotlib takes ~0.4 s
    if spec is None or spec.origin is None:
        return ()
    folder = Path(spec.origin).parent / "mpl-data" / "fonts" / "ttf"
    return tuple(str(p) for p in sorted(folder.glob("DejaVu*.ttf")) if "Display" not in p.name)


@functools.cache
def load_font(path: str, size: int) -> ImageFont.FreeTypeFont:
    """A TrueType font at ``size`` pixels; Pillow's built-in font for an empty path."""
    return ImageFont.truetype(path, size) if path else ImageFont.load_default(size)  # type: ignore[return-value]


def pick_font(rng: np.random.Generator, size: int) -> ImageFont.FreeTypeFont:
    """A random DejaVu face (sans, serif, mono; regular, bold, oblique) at ``size`` pixels."""
    paths = font_paths() or ("",)
    return load_font(paths[int(rng.integers(len(paths)))], int(size))


def ink_color(rng: np.random.Generator) -> Color:
    return tuple(int(v) for v in rng.integers(0, 90, 3))  # type: ignore[return-value]


def paper_color(rng: np.random.Generator) -> Color:
    return tuple(int(v) for v in rng.integers(200, 256, 3))  # type: ignore[return-value]


def random_text(rng: np.random.Generator, lo: int = 2, hi: int = 6, words: tuple[str, ...] = WORDS) -> str:
    """A line of ``lo``..``hi`` tokens: words (some capitalised) mixed with numbers, dates and prices."""
    out = []
    for _ in range(int(rng.integers(lo, hi + 1))):
        kind = rng.random()
        if kind < 0.12:
            out.append(str(int(rng.integers(0, 100000))))
        elif kind < 0.18:
            day, month, year = int(rng.integers(1, 29)), int(rng.integers(1, 13)), int(rng.integers(1990, 2031))
            out.append(f"{day:02d}/{month:02d}/{year}")
        elif kind < 0.24:
            out.append(f"${int(rng.integers(1, 5000))}.{int(rng.integers(0, 100)):02d}")
        else:
            w = words[int(rng.integers(len(words)))]
            out.append(w.capitalize() if rng.random() < 0.3 else w.upper() if rng.random() < 0.05 else w)
    text = " ".join(out)
    return text + "." if rng.random() < 0.2 else text


def add_noise(image: Image.Image, rng: np.random.Generator, sigma: float) -> Image.Image:
    """Gaussian grain, the same on the three channels (scanner or camera luminance noise)."""
    noise = rng.standard_normal((image.size[1], image.size[0], 1), dtype=np.float32) * np.float32(sigma)
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) + noise
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def render_line(
    text: str, rng: np.random.Generator, size: int = 32, pad: float = 0.25, font: ImageFont.FreeTypeFont | None = None
) -> Image.Image:
    """``text`` on paper, cropped to the ink plus about ``pad`` x font size, sometimes blurred, with grain (RGB)."""
    font = font or pick_font(rng, size)
    x1, y1, x2, y2 = font.getbbox(text)
    m = max(2, int(pad * size * rng.uniform(0.6, 1.4)))
    image = Image.new("RGB", (x2 - x1 + 2 * m, y2 - y1 + 2 * m), paper_color(rng))
    ImageDraw.Draw(image).text((m - x1, m - y1), text, font=font, fill=ink_color(rng))
    if rng.random() < 0.5:
        image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 0.9))))
    return add_noise(image, rng, float(rng.uniform(2, 8)))


def render_captcha(text: str, rng: np.random.Generator, width: int = 160, height: int = 60) -> Image.Image:
    """A captcha in the style of the ``captcha`` package: rotated, warped glyphs, noise dots and an arc, smoothed.

    (That package draws from ``secrets``, which cannot be seeded, hence this re-implementation.)
    """
    bg, fg = paper_color(rng), ink_color(rng)
    glyphs = []
    for c in text:
        font = pick_font(rng, int(height * rng.uniform(0.6, 0.85)))
        x1, y1, x2, y2 = font.getbbox(c)
        im = Image.new("RGBA", (x2 - x1 + 6, y2 - y1 + 6))
        ImageDraw.Draw(im).text((3 - x1, 3 - y1), c, font=font, fill=(*fg, 255))
        im = im.rotate(float(rng.uniform(-25, 25)), Image.Resampling.BILINEAR, expand=True)
        w, h = im.size
        q = rng.uniform(-1, 1, 8) * np.array([w, h] * 4) * rng.uniform(0.05, 0.15)
        quad = tuple(float(v) for v in (q[0], q[1], q[2], h + q[3], w + q[4], h + q[5], w + q[6], q[7]))
        glyphs.append(im.transform((w, h), Image.Transform.QUAD, quad, Image.Resampling.BILINEAR))
    canvas = Image.new("RGB", (max(sum(g.size[0] for g in glyphs) + 8, width), height), bg)
    x = 4
    for g in glyphs:
        g = g.resize((g.size[0], min(g.size[1], height)))
        canvas.paste(g, (x, max(0, (height - g.size[1]) // 2 + int(rng.integers(-4, 5)))), g)
        x += g.size[0] - int(rng.integers(0, max(1, g.size[0] // 6)))  # glyphs touch or overlap a little
    canvas = canvas.resize((width, height), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(10, 40))):
        px, py = int(rng.integers(0, width)), int(rng.integers(0, height))
        draw.line(((px, py), (px - 1, py - 1)), fill=fg, width=2)
    x1, y1 = int(rng.integers(0, width // 5)), int(rng.integers(height // 5, height // 2))
    arc = (x1, y1, int(rng.integers(width // 2, width)), int(rng.integers(y1 + 1, height)))
    draw.arc(arc, 0, 180, fill=fg, width=2)
    return canvas.filter(ImageFilter.SMOOTH)


def render_click_scene(rng: np.random.Generator, width: int, height: int) -> tuple[Image.Image, list[Box]]:
    """A click-captcha scene: 3-6 large rotated, outlined glyphs on a blurred colourful background, and their boxes."""
    field = rng.integers(40, 240, (4, 4, 3)).astype(np.uint8)
    image = Image.fromarray(field).resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(5, 15))):  # blobs stand in for the photo behind a real click captcha
        x, y, r = int(rng.integers(width)), int(rng.integers(height)), int(rng.integers(10, 80))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    image = image.filter(ImageFilter.GaussianBlur(6))
    boxes: list[Box] = []
    want = int(rng.integers(3, 7))
    for _ in range(10 * want):
        if len(boxes) == want:
            break
        font = pick_font(rng, int(rng.integers(32, 64)))
        c = CAPTCHA_CHARS[int(rng.integers(len(CAPTCHA_CHARS)))]
        x1, y1, x2, y2 = font.getbbox(c)
        glyph = Image.new("RGBA", (x2 - x1 + 8, y2 - y1 + 8))
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        edge = (*(255 - v for v in fill), 255)
        ImageDraw.Draw(glyph).text((4 - x1, 4 - y1), c, font=font, fill=(*fill, 255), stroke_width=2, stroke_fill=edge)
        glyph = glyph.rotate(float(rng.uniform(-40, 40)), Image.Resampling.BILINEAR, expand=True)
        glyph = glyph.crop(glyph.getbbox())
        gw, gh = glyph.size
        if gw >= width or gh >= height:
            continue
        px, py = int(rng.integers(0, width - gw)), int(rng.integers(0, height - gh))
        box = (px, py, px + gw, py + gh)
        if any(px < b[2] and b[0] < box[2] and py < b[3] and b[1] < box[3] for b in boxes):
            continue  # the glyphs of a click captcha do not overlap
        image.paste(glyph, (px, py), glyph)
        boxes.append(box)
    return add_noise(image, rng, float(rng.uniform(3, 8))), boxes


def render_page(rng: np.random.Generator, width: int, height: int) -> tuple[Image.Image, list[Box]]:
    """A document-like page: lines of text at random sizes, some indented, some light on a dark band.

    Returns the image and the line boxes.
    """
    paper = paper_color(rng)
    image = Image.new("RGB", (width, height), paper)
    draw = ImageDraw.Draw(image)
    boxes: list[Box] = []
    y = int(rng.integers(8, 40))
    margin = int(rng.integers(10, max(11, width // 8)))
    while True:
        size = int(rng.integers(14, 34))
        font = pick_font(rng, size)
        text = random_text(rng, 1, 8)
        x = margin + int(rng.integers(0, width // 4)) if rng.random() < 0.3 else margin
        bx1, by1, bx2, by2 = draw.textbbox((x, y), text, font=font)
        if by2 > height - 8:
            break
        while bx2 > width - 8 and " " in text:  # too long for the page: drop words until it fits
            text = text.rsplit(" ", 1)[0]
            bx1, by1, bx2, by2 = draw.textbbox((x, y), text, font=font)
        if bx2 > width - 8:
            y += size
            continue
        banner = rng.random() < 0.12
        if banner:  # a heading on a dark band
            draw.rectangle((bx1 - 6, by1 - 4, bx2 + 6, by2 + 4), fill=ink_color(rng))
        draw.text((x, y), text, font=font, fill=paper if banner else ink_color(rng))
        boxes.append((bx1, by1, bx2, by2))
        y = by2 + int(size * rng.uniform(0.5, 1.6)) + (8 if banner else 0)
    return add_noise(image, rng, float(rng.uniform(2, 6))), boxes


def render_table(rng: np.random.Generator) -> tuple[Image.Image, tuple[int, int]]:
    """A table as found in reports: a header row, 2-8 body rows, 2-6 columns; full grid, row rules or none.

    Returns the image and its (rows, columns).
    """
    rows, cols = int(rng.integers(3, 10)), int(rng.integers(2, 7))
    size = int(rng.integers(13, 22))
    font = pick_font(rng, size)
    bold = load_font(next((p for p in font_paths() if p.endswith("Sans-Bold.ttf")), ""), size)
    cells = [
        [
            random_text(rng, 1, 2) if r == 0 or c == 0 or rng.random() < 0.3 else str(int(rng.integers(0, 10**5)))
            for c in range(cols)
        ]
        for r in range(rows)
    ]
    pad = int(rng.integers(4, 12))
    widths = [
        max(int((bold if r == 0 else font).getlength(cells[r][c])) for r in range(rows)) + 2 * pad for c in range(cols)
    ]
    row_h, margin = size + 2 * pad, int(rng.integers(4, 30))
    image = Image.new("RGB", (sum(widths) + 2 * margin, rows * row_h + 2 * margin), paper_color(rng))
    draw = ImageDraw.Draw(image)
    style = int(rng.integers(3))  # 0: full grid, 1: row rules only, 2: no rules but a shaded header
    ink, xs = ink_color(rng), [int(v) for v in np.cumsum([margin, *widths])]
    bottom = margin + rows * row_h
    if style == 2:
        draw.rectangle((margin, margin, xs[-1], margin + row_h), fill=tuple(int(v * 0.8) for v in paper_color(rng)))
    for r in range(rows):
        y = margin + r * row_h
        for c in range(cols):
            draw.text((xs[c] + pad, y + pad), cells[r][c], font=bold if r == 0 else font, fill=ink)
        if style < 2 or r == 1:
            draw.line((margin, y, xs[-1], y), fill=ink, width=1)
    if style < 2:
        draw.line((margin, bottom, xs[-1], bottom), fill=ink, width=1)
    if style == 0:
        for x in xs:
            draw.line((x, margin, x, bottom), fill=ink, width=1)
    return add_noise(image, rng, float(rng.uniform(1, 5))), (rows, cols)
