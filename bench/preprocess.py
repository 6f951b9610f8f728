"""Photo preprocessing as the worker runs it (``model.preprocess``): speed per image, colour accuracy, on rendered product photos (``model.render``: 600-1000 px JPEGs, quality 90, the photo
import's bytes) and generated non-garments (``model.outliers``).

    python -m bench.preprocess [--part speed,colour] [--n 300] [--spec D]

* ``speed``: milliseconds per image on one thread (best of 3 passes), for ``decode_image`` (the model
  input alone, what training builds its data with) and ``decode`` with the analysis and colours (what
  the pipeline calls), plus the stages of the latter. Works against older trees too (then only the
  functions they have are timed), so that a before/after pair is one command run twice.
* ``colour``: the 1-2 dominant colours against the renderer's truth (``RenderedPhoto.colours``): primary
  colour right, the set exactly right, per-tag precision and recall; the same on the full-resolution
  decode with the exact Lab match as the reference.

How often a trained checkpoint's frame rule and review score flag rendered garments and each outlier family
is ``styletag eval --from-catalog``'s report (the rule is fitted on validation, so it is the checkpoint's).

Specs: D = lab-delta 28 px cropped to the garment (dev/photo_proto.py's design D), A = colour 64 px padded.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from bench import common as C

NAME = "preprocess"
MAX_PIXELS = 40_000_000
SPECS = {
    "D": dict(channels=3, input_size=28, fit="pad", foreground_crop=True, representation="lab-delta",
              mean=(0.2860, 0.5, 0.5), std=(0.3530, 0.25, 0.25), margin=0.0),
    "A": dict(channels=3, input_size=64, fit="pad", foreground_crop=False, representation="as-is",
              mean=(0.5,), std=(0.5,)),
    "legacy28": dict(channels=1, input_size=28),
}
# The robust renderer of dev/photo_proto.py: other tints, sizes 30-95 %, no shadow, stronger light changes.
ROBUST_STYLE = dict(
    backdrop_weights=(0.15, 0.2, 0.2, 0.45), pastel_saturation=(0.12, 0.35), backdrop_value=(0.72, 0.97),
    item_scale=(0.30, 0.95), shadow_p=0.0, lighting=0.2, rotation=15.0, gradient_p=0.7,
    gradient_strength=(0.05, 0.2), vignette_p=0.5, vignette_strength=(0.1, 0.3),
    aspects=((1, 1), (2, 3), (3, 2), (9, 16), (16, 9), (4, 5)),
)


def photos(n: int, split: str = "test") -> list[tuple[bytes, tuple[str, ...]]]:
    """The photo import's bytes and colours of items 0..n-1 (catalog.importers.photos.render_jpeg)."""
    from catalog.importers.photos import render_jpeg
    from model.fmnist import load_split

    images = load_split(split)[0]
    return [render_jpeg(images[i], split, i) for i in range(n)]


def speed(res: C.Result, blobs: list[bytes], spec_name: str) -> None:
    from model import preprocess as P

    spec = P.PreprocessSpec(**SPECS[spec_name])
    figs = res.figures
    figs[f"ms_decode_image_{spec_name}"] = C.best_ms(lambda b: P.decode_image(b, spec, MAX_PIXELS), blobs)
    legacy = P.PreprocessSpec(**SPECS["legacy28"])
    figs["ms_decode_image_legacy28"] = C.best_ms(lambda b: P.decode_image(b, legacy, MAX_PIXELS), blobs)
    if hasattr(P, "decode"):  # the serving path: model input + colours, one backdrop fit
        figs[f"ms_decode_served_{spec_name}"] = C.best_ms(
            lambda b: P.decode(b, spec, MAX_PIXELS, colours=True), blobs)
    # stages of the photo path, on the drafted pictures
    from model import colour as K

    pics = [np.asarray(P.to_mode(P.open_image(b, MAX_PIXELS, ("RGB", (spec.work_size,) * 2)), 3)) for b in blobs]
    figs["ms_stage_open_draft"] = C.best_ms(
        lambda b: P.to_mode(P.open_image(b, MAX_PIXELS, ("RGB", (spec.work_size,) * 2)), 3), blobs)
    from PIL import Image

    def work(rgb):
        h, w = rgb.shape[:2]
        k = spec.work_size / max(h, w)
        return np.asarray(Image.fromarray(rgb).resize((max(1, round(w * k)), max(1, round(h * k))),
                                                      Image.Resampling.BILINEAR))

    works = [work(p) for p in pics]
    figs["ms_stage_fit_backdrop"] = C.best_ms(K.fit_backdrop, works)
    coefs = [K.fit_backdrop(w) for w in works]
    figs["ms_stage_distance"] = C.best_ms(lambda i: K.distance_from_backdrop(works[i], coefs[i]), list(range(len(works))))
    if "coef" in K.dominant_colours.__code__.co_varnames:
        figs["ms_stage_colours"] = C.best_ms(lambda i: K.dominant_colours(pics[i], coef=coefs[i]),
                                            list(range(len(pics))))
    else:
        figs["ms_stage_colours_own_fit"] = C.best_ms(K.dominant_colours, pics)
    res.parameters["picture_px_mean"] = float(np.mean([max(p.shape[:2]) for p in pics]))
    C.log("speed: " + ", ".join(f"{k[3:]} {v:.2f} ms" for k, v in figs.items() if k.startswith("ms_")))


def _score(pairs: list[tuple[tuple[str, ...], list[str]]]) -> dict:
    n = len(pairs)
    tp = sum(len(set(t) & set(g)) for t, g in pairs)
    return {"n": n, "primary": sum(bool(g) and g[0] == t[0] for t, g in pairs) / n,
            "exact_set": sum(set(g) == set(t) for t, g in pairs) / n,
            "tag_precision": tp / max(1, sum(len(g) for _, g in pairs)),
            "tag_recall": tp / max(1, sum(len(t) for t, _ in pairs)),
            "single_colour_primary": _ratio([bool(g) and g[0] == t[0] for t, g in pairs if len(t) == 1]),
            "two_colour_exact": _ratio([set(g) == set(t) for t, g in pairs if len(t) == 2])}


def _ratio(flags: list[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def colour(res: C.Result, items: list[tuple[bytes, tuple[str, ...]]], spec_name: str) -> None:
    from model import preprocess as P
    from model.colour import dominant_colours, nearest_colour_index, srgb_to_lab

    spec = P.PreprocessSpec(**SPECS[spec_name])
    served, reference = [], []
    for data, truth in items:
        got = [n for n, _ in P.decode(data, spec, MAX_PIXELS, colours=True).colours]
        served.append((truth, got))
    res.figures[f"colour_served_{spec_name}"] = _score(served)
    # reference: the whole photo, no draft, exact Lab naming (what resolution alone would give)
    import model.colour as K

    exact = K.colour_indices
    K.colour_indices = lambda rgb: nearest_colour_index(srgb_to_lab(np.asarray(rgb, np.uint8)))
    try:
        for data, truth in items[: max(50, len(items) // 3)]:
            rgb = np.asarray(P.to_mode(P.open_image(data, MAX_PIXELS), 3))
            reference.append((truth, [n for n, _ in dominant_colours(rgb)]))
    finally:
        K.colour_indices = exact
    res.figures["colour_reference_full_resolution_exact"] = _score(reference)
    misses = Counter(f"{'|'.join(t)} -> {'|'.join(g) or '-'}" for t, g in served if set(t) != set(g))
    res.figures[f"colour_served_{spec_name}_misses"] = dict(misses.most_common(12))
    C.log(f"colour {spec_name}: {res.figures[f'colour_served_{spec_name}']}")
    C.log(f"colour reference: {res.figures['colour_reference_full_resolution_exact']}")


def main(argv=None) -> int:
    p = C.parser(NAME, __doc__)
    p.add_argument("--part", default="speed,colour")
    p.add_argument("--n", type=int, default=300, help="rendered photos")
    p.add_argument("--spec", default="D", choices=[k for k in SPECS if k != "legacy28"])
    p.add_argument("--out", default="", help="results file name (default bench/results/preprocess.json)")
    args = p.parse_args(argv)
    n = 30 if args.quick else args.n
    res = C.Result(args.out or NAME, "Photo preprocessing: ms per image, colour accuracy")
    res.parameters = {"photos": n, "spec": SPECS[args.spec], "threads": 1, "timing": "best of 3 passes",
                      "tree": str(Path(__file__).resolve().parent.parent),
                      "parts": args.part}
    parts = set(args.part.split(","))
    items = photos(n) if parts & {"speed", "colour"} else []
    if "speed" in parts:
        speed(res, [d for d, _ in items], args.spec)
    if "colour" in parts:
        colour(res, items, args.spec)
    path = res.write(args.quick)
    C.log(f"wrote {path} (load {os.getloadavg()[0]:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
