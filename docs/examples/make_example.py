"""Draws ``scene.png``, the quick start's example input: a 64x64 landscape (sky, sun, hills, a house, a tree)
made here so that the repository ships no third-party photo. ``python docs/examples/make_example.py`` writes
the same bytes every time (drawn at 256x256, then reduced with Lanczos)."""

from pathlib import Path

from PIL import Image, ImageDraw


def scene(size: int = 64) -> Image.Image:
    s = 256
    img = Image.new("RGB", (s, s))
    d = ImageDraw.Draw(img)
    for y in range(s):  # sky: deep blue at the top to pale near the horizon
        t = y / s
        d.line([(0, y), (s, y)], fill=(int(70 + 140 * t), int(130 + 90 * t), int(220 + 30 * t)))
    d.ellipse([180, 30, 230, 80], fill=(255, 220, 90))  # sun
    d.ellipse([-80, 150, 200, 380], fill=(70, 150, 60))  # far hill
    d.ellipse([90, 170, 380, 400], fill=(40, 120, 45))  # near hill
    d.rectangle([40, 160, 100, 215], fill=(200, 80, 60))  # house
    d.polygon([(32, 162), (70, 125), (108, 162)], fill=(110, 50, 40))  # roof
    d.rectangle([62, 185, 78, 215], fill=(90, 60, 40))  # door
    d.rectangle([160, 150, 172, 205], fill=(100, 70, 40))  # trunk
    d.ellipse([135, 100, 197, 165], fill=(30, 100, 35))  # crown
    return img.resize((size, size), Image.LANCZOS)


if __name__ == "__main__":
    out = Path(__file__).with_name("scene.png")
    scene().save(out, optimize=True)
    print(f"wrote {out} ({out.stat().st_size} bytes)")
