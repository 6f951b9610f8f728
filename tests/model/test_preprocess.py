"""model.preprocess: the one preprocessing function, its spec, and parity with the worker's old decoder."""

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import PIL
import pytest
from PIL import Image

from model.calibration import frame_flags
from model.colour import PALETTE
from model.errors import BadImage
from model.preprocess import PreprocessSpec, decode, decode_image, to_tensor
from tests.security.corpus import corpus, exif_rotated_jpeg, png_bomb

MAX_PIXELS = 40_000_000
CREAM = (240, 234, 218)


def _jpeg(arr: np.ndarray, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def _studio(h: int, w: int, base=CREAM, gradient: float = 0.0) -> np.ndarray:
    x = np.linspace(-1, 1, w, dtype=np.float32)[None, :, None]
    return np.clip(np.asarray(base, np.float32) * (1 + gradient * x) * np.ones((h, 1, 1), np.float32), 0, 255)


def _photo_samples() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    garment = _studio(900, 700).astype(np.uint8)
    garment[200:700, 250:450] = (30, 40, 90)
    rgba = Image.new("RGBA", (640, 800), (0, 0, 0, 0))
    rgba.paste((200, 30, 40, 255), (200, 200, 440, 600))
    grey16 = Image.fromarray((rng.integers(0, 65535, (700, 640))).astype(np.uint16))
    return {"photo.jpg": _jpeg(garment), "noise.jpg": _jpeg(rng.integers(0, 256, (613, 977, 3), dtype=np.uint8)),
            "rgba.png": _png(rgba), "grey16.png": _png(grey16), "exif.jpg": exif_rotated_jpeg(),
            "palette.gif": _png(Image.fromarray(garment).convert("P"))}


LEGACY_SAMPLES = list(_photo_samples().items()) + [(s.name, s.data) for s in corpus(4_000_000)]


GOLDEN = Path(__file__).parent / "data" / "legacy_decode.json"


def _digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


@pytest.mark.parametrize(("channels", "size"), [(1, 28), (3, 28), (3, 64)])
def test_legacy_spec_is_byte_identical_to_the_worker_decoder(channels, size):
    """The legacy spec (checkpoints without 'preprocess') gives exactly what the worker's own decoder
    (worker/decode.py, removed when the worker moved to model.preprocess) gave: its outputs for this corpus
    were recorded in tests/model/data/legacy_decode.json (shape and sha256 of every array, or the failure
    reason) before it was removed. The digests hold for the Pillow version recorded there (JPEG and PNG
    codecs may round differently in another); regenerate them with that decoder's replacement only after
    checking the outputs by other means."""
    golden = json.loads(GOLDEN.read_text())
    if golden["pillow"] != PIL.__version__:
        pytest.skip(f"golden digests were recorded with Pillow {golden['pillow']}, this is {PIL.__version__}")
    spec = PreprocessSpec.from_checkpoint_meta({"channels": channels, "input_size": size, "mean": [0.5], "std": [0.5]})
    assert spec.is_legacy
    compared = 0
    for name, data in LEGACY_SAMPLES:
        want = golden["samples"][f"{channels}x{size}/{name}"]
        assert hashlib.sha256(data).hexdigest() == want["input_sha256"], f"{name}: the corpus changed"
        try:
            got, got_reason = decode_image(data, spec, MAX_PIXELS), None
        except BadImage as exc:
            got, got_reason = None, exc.reason
        assert got_reason == want.get("reason"), name
        if got is not None:
            assert got.dtype == np.uint8 and list(got.shape) == want["shape"] and _digest(got) == want["sha256"], name
            compared += 1
    assert compared >= 8


def test_spec_round_trips_through_checkpoint_json():
    spec = PreprocessSpec(channels=3, input_size=32, fit="pad", foreground_crop=True, representation="distance",
                          mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6), margin=0.0)
    meta = json.loads(json.dumps({"channels": 1, "input_size": 28, "preprocess": spec.to_dict()}))
    assert PreprocessSpec.from_checkpoint_meta(meta) == spec
    old = PreprocessSpec.from_checkpoint_meta({"channels": 1, "input_size": 28, "mean": [0.286], "std": [0.353]})
    assert (old.fit, old.foreground_crop, old.representation, old.mean) == ("stretch", False, "as-is", (0.286,))
    with pytest.raises(ValueError):
        PreprocessSpec(fit="zoom")
    with pytest.raises(ValueError):
        PreprocessSpec(representation="sepia")
    with pytest.raises(ValueError):
        PreprocessSpec(channels=2)


def test_pad_colour_is_the_backdrop():
    img = _studio(900, 600, gradient=0.0).astype(np.uint8)
    img[300:600, 250:350] = (30, 40, 90)
    out = decode_image(_jpeg(img), PreprocessSpec(channels=3, input_size=60, fit="pad"), MAX_PIXELS)
    assert out.shape == (60, 60, 3)
    pad = np.concatenate([out[:, :8].reshape(-1, 3), out[:, -8:].reshape(-1, 3)])  # 600/900*60 = 40 px wide
    assert np.abs(pad.astype(int) - CREAM).max() <= 4
    grey = decode_image(_jpeg(img), PreprocessSpec(channels=1, input_size=60, fit="pad", representation="invert"),
                        MAX_PIXELS)
    assert abs(int(grey[30, 2, 0]) - (255 - round(0.299 * 240 + 0.587 * 234 + 0.114 * 218))) <= 4


def test_foreground_crop_finds_a_known_box_despite_gradient_and_shadow():
    img = _studio(800, 1000, gradient=0.06)
    img[260:660, 420:640] *= 0.88  # a soft shadow down and right of the garment
    img[240:640, 400:620] = (200, 30, 40)  # the garment: 400 tall, 220 wide
    spec = PreprocessSpec(channels=1, input_size=32, fit="pad", foreground_crop=True, representation="distance",
                          mean=(0.5,), std=(0.5,), margin=0.0)
    out = decode_image(_jpeg(img.astype(np.uint8)), spec, MAX_PIXELS)[..., 0]
    ys, xs = np.nonzero(out > 128)
    assert ys.min() <= 1 and ys.max() >= 30, "the garment's long side fills the input"
    width = xs.max() - xs.min() + 1
    assert abs(width - 32 * 220 / 400) <= 2.5, width
    assert abs((xs.min() + xs.max()) / 2 - 15.5) <= 1.5, "centred"
    assert out[:, :3].max() < 60 and out[:, -3:].max() < 60, "the shadow is not garment"


def test_distance_representation_ignores_the_backdrop_tint():
    outs = []
    for base in ((250, 250, 250), (226, 236, 248), (248, 228, 236)):
        img = _studio(700, 700, base=base)
        img[150:550, 250:450] = (30, 40, 90)
        img[250:300, 250:450] = (240, 130, 30)
        spec = PreprocessSpec(channels=1, input_size=28, fit="pad", foreground_crop=True, representation="distance")
        outs.append(decode_image(_jpeg(img.astype(np.uint8)), spec, MAX_PIXELS).astype(np.float32))
    boxes = []
    for out in outs:
        ys, xs = np.nonzero(out[..., 0] > 128)
        boxes.append(np.array([ys.min(), ys.max(), xs.min(), xs.max()]))
    for out, box in zip(outs[1:], boxes[1:], strict=True):
        assert np.abs(box - boxes[0]).max() <= 1  # the same garment in the same place, give or take a pixel
        assert abs(out.mean() - outs[0].mean()) < 8  # and about as bright


def test_lab_delta_keeps_shading_and_centres_the_backdrop():
    img = _studio(700, 700, base=(226, 236, 248))
    img[150:550, 250:450] = (30, 40, 90)
    img[150:550, 250:350] *= 0.6  # the garment's left half in shade
    spec = PreprocessSpec(channels=3, input_size=28, fit="pad", foreground_crop=True, representation="lab-delta",
                          margin=0.0)
    out = decode_image(_jpeg(img.astype(np.uint8)), spec, MAX_PIXELS).astype(int)
    assert np.abs(out[:, :3] - [0, 128, 128]).max() <= 3, "backdrop and padding are (0, 128, 128)"
    lit, shade = out[4:24, 16:20, 1].mean(), out[4:24, 8:12, 1].mean()
    assert lit < 128 and shade < lit - 8, (lit, shade)  # darker than the backdrop, and the shade darker still
    with pytest.raises(ValueError):
        PreprocessSpec(channels=1, representation="lab-delta")


def test_exif_rotation_and_transparency_are_applied():
    spec = PreprocessSpec(channels=1, input_size=28, fit="pad", representation="as-is")
    grey = decode_image(exif_rotated_jpeg(), spec, MAX_PIXELS)[..., 0].astype(np.float32)
    # stored 40x20 with a dark top half; orientation 6 shows it turned clockwise: bright half on the left
    # turned, it is 20 wide and 40 tall: padded to a square it fills columns 7-20
    assert grey[:, 8:13].mean() > 200 and grey[:, 16:20].mean() < 50
    rgba = Image.new("RGBA", (600, 800), (0, 0, 0, 0))
    rgba.paste((200, 30, 40, 255), (150, 200, 450, 600))
    dist = PreprocessSpec(channels=1, input_size=32, fit="pad", foreground_crop=True, representation="distance",
                          margin=0.0)
    out = decode_image(_png(rgba), dist, MAX_PIXELS)[..., 0]
    ys, xs = np.nonzero(out > 128)  # transparent -> white backdrop; the opaque 300x400 square is the garment
    assert ys.min() <= 1 and ys.max() >= 30 and abs((xs.max() - xs.min() + 1) - 24) <= 2
    rgb = decode_image(_png(rgba), PreprocessSpec(channels=3, input_size=32, fit="pad"), MAX_PIXELS)
    assert (rgb[0, 0] >= 250).all(), "transparency is composited onto white"


def test_centre_crop_and_stretch_fits():
    img = np.zeros((600, 900, 3), np.uint8)
    img[:, :100] = (255, 0, 0)
    img[:, 100:800] = (0, 255, 0)
    img[:, 800:] = (0, 0, 255)
    crop = decode_image(_png(Image.fromarray(img)), PreprocessSpec(channels=3, input_size=30, fit="crop"), MAX_PIXELS)
    assert crop[:, :, 1].min() >= 250, "the centre crop is all green"
    stretch = decode_image(_png(Image.fromarray(img)), PreprocessSpec(channels=3, input_size=30, fit="stretch",
                                                                      representation="distance"), MAX_PIXELS)
    assert stretch.shape == (30, 30, 3)


@pytest.mark.parametrize(("data", "reason"), [(b"", "empty"), (_jpeg(np.zeros((99, 99, 3), np.uint8))[:400], "truncated"),
                                              (b"%!PS-Adobe-3.0 EPSF-3.0\n", "not_an_image"),
                                              (png_bomb(7000), "too_many_pixels")])
def test_failures_are_bad_images_with_a_reason(data, reason):
    spec = PreprocessSpec(channels=1, input_size=28, fit="pad", foreground_crop=True, representation="distance")
    with pytest.raises(BadImage) as info:
        decode_image(data, spec, MAX_PIXELS)
    assert info.value.reason == reason and "\n" not in str(info.value)


def _garment_photo(name: str, base, second: str | None = None) -> bytes:
    """An 800x1000 studio photo: a shaded ellipse of palette colour ``name`` (with ``second`` in stripes
    of equal width), JPEG quality 90."""
    img = _studio(1000, 800, base=base, gradient=0.05)
    yy, xx = np.mgrid[0:1000, 0:800]
    inside = ((yy - 520) / 330) ** 2 + ((xx - 400) / 220) ** 2 < 1
    shade = (0.85 + 0.15 * xx / 800)[..., None]
    cloth = np.asarray(PALETTE[name], np.float32) * shade
    if second:
        cloth = np.where(((xx // 40) % 2 == 0)[..., None], np.asarray(PALETTE[second], np.float32) * shade, cloth)
    img[inside] = cloth[inside]
    return _jpeg(img.astype(np.uint8), quality=90)


PHOTO = PreprocessSpec(channels=3, input_size=28, fit="pad", foreground_crop=True, representation="lab-delta",
                       margin=0.0)
# a frame rule as training fits one (model.calibration.fit_frame_rule), read on the uint8 model input
RULE = {"frame_rule": {"level": 64, "min_foreground": 0.02, "max_border": 0.6}}


def _no_garment(d) -> bool:
    return bool(frame_flags(d.array[None], RULE)[0])


@pytest.mark.parametrize("name", list(PALETTE))
def test_decode_names_the_colour_of_a_generated_garment(name):
    """Every palette colour, on a light backdrop (a white garment on a mid-grey one: on white it is no
    foreground at all, which the frame rule then says)."""
    base = (165, 168, 172) if name == "white" else CREAM
    data = _garment_photo(name, base)
    d = decode(data, PHOTO, MAX_PIXELS, colours=True)
    assert [n for n, _ in d.colours] == [name] and d.colours[0][1] > 0.9
    assert not _no_garment(d)
    assert np.array_equal(d.array, decode_image(data, PHOTO, MAX_PIXELS)), "the analysis never changes the input"
    assert decode(data, PHOTO, MAX_PIXELS).colours is None  # named only when asked


def test_decode_names_two_colours_and_flags_pictures_without_a_garment():
    d = decode(_garment_photo("navy", CREAM, second="yellow"), PHOTO, MAX_PIXELS, colours=True, max_colours=2)
    assert {n for n, _ in d.colours} == {"navy", "yellow"} and all(0.4 < s < 0.6 for _, s in d.colours)
    assert [n for n, _ in decode(_garment_photo("navy", CREAM, second="yellow"), PHOTO, MAX_PIXELS, colours=True,
                                 max_colours=1).colours] in (["navy"], ["yellow"])
    white = decode(_garment_photo("white", (250, 250, 250)), PHOTO, MAX_PIXELS, colours=True)
    assert _no_garment(white) and white.colours == ()
    blank = decode(_jpeg(_studio(700, 600, gradient=0.08).astype(np.uint8)), PHOTO, MAX_PIXELS)
    assert _no_garment(blank)
    noise = decode(_jpeg(np.random.default_rng(1).integers(0, 256, (700, 600, 3), dtype=np.uint8)), PHOTO,
                   MAX_PIXELS)
    assert _no_garment(noise)
    legacy = decode(_garment_photo("red", CREAM), PreprocessSpec(channels=1, input_size=28), MAX_PIXELS, colours=True)
    assert legacy.colours is None  # legacy: nothing analysed


def test_to_tensor_is_the_specs_normalisation_of_decoded_images():
    spec = PreprocessSpec(channels=3, input_size=28, fit="pad", foreground_crop=True, representation="lab-delta",
                          mean=(0.3, 0.5, 0.5), std=(0.35, 0.25, 0.2))
    batch = np.stack([decode_image(_garment_photo(n, CREAM), spec, MAX_PIXELS) for n in ("red", "navy")])
    x = to_tensor(batch, spec)
    assert x.shape == (2, 3, 28, 28) and x.dtype.is_floating_point
    want = (batch.transpose(0, 3, 1, 2) / 255.0 - np.array(spec.mean)[None, :, None, None]) / np.array(
        spec.std)[None, :, None, None]
    assert np.allclose(x.numpy(), want, atol=1e-5)
    grey = PreprocessSpec(channels=1, input_size=14, mean=(0.5,), std=(0.25,))  # resized and reduced to luma
    assert to_tensor(batch, grey).shape == (2, 1, 14, 14)
