"""Training and evaluation data from the catalog: products with ``style_truth`` of a taxonomy, their images
read through the worker's own storage reader (``ImageReader.from_settings``) and preprocessed by THE
preprocessing function (``model.preprocess.decode_image``) of the checkpoint's spec: what serving will see.

* Split: a stable hash of the SKU (sha256, first 8 bytes, modulo 100) puts each product in train /
  validation / test by percentage (80/10/10 by default); SKUs matching ``test_match`` (a glob) are test
  whatever their hash. The rule is recorded in the checkpoint (``data.split``) and ``eval`` applies it
  again, so a product never moves between splits and the test split is never trained or selected on.
* Decoded arrays are cached once per preprocessing spec under ``STYLETAG_HOME/training-cache/``, keyed
  by each image's URI and catalog version: a re-run decodes only new or changed images.
* Generated non-garment images (``model.outliers``) for outlier exposure, threshold fitting and their
  evaluation are rendered, JPEG-encoded and decoded the same way, and cached the same way.
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import json
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from catalog.errors import StyletagError
from catalog.settings import Settings
from model.parallel import pool_map

CACHE_VERSION = 1
SPLITS = ("train", "val", "test")
CHUNK = 64


class TrainingDataError(StyletagError):
    """The catalog has no usable training or evaluation data for the request."""


# --------------------------------------------------------------------------- split


def sku_bucket(sku: str) -> int:
    """0-99, stable across machines and Python versions (no ``hash()`` salt)."""
    return int.from_bytes(hashlib.sha256(sku.encode("utf-8")).digest()[:8], "big") % 100


@dataclass(frozen=True)
class SplitRule:
    train: int = 80
    val: int = 10
    test: int = 10
    test_match: str | None = None  # SKUs matching this glob are the test split (and nothing else is)

    def __post_init__(self):
        if min(self.train, self.val, self.test) < 0 or self.train + self.val + self.test != 100:
            raise TrainingDataError(f"split {self.train}/{self.val}/{self.test} must be three shares summing to 100")
        if self.train == 0:
            raise TrainingDataError("the split leaves nothing to train on")

    def split_of(self, sku: str) -> str:
        if self.test_match is not None:
            if fnmatch.fnmatchcase(sku, self.test_match):
                return "test"
            b = sku_bucket(sku) * (self.train + self.val) // 100  # the rest shares train/val in their ratio
            return "train" if b < self.train else "val"
        b = sku_bucket(sku)
        return "train" if b < self.train else ("val" if b < self.train + self.val else "test")

    def to_dict(self) -> dict:
        return {"rule": "sha256(sku)[:8] % 100", **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict | None) -> SplitRule:
        d = d or {}
        return cls(int(d.get("train", 80)), int(d.get("val", 10)), int(d.get("test", 10)), d.get("test_match"))

    @classmethod
    def parse(cls, text: str, test_match: str | None = None) -> SplitRule:
        try:
            parts = [int(p) for p in text.split("/")]
        except ValueError:
            parts = []
        if len(parts) != 3:
            raise TrainingDataError(f"--split {text!r}: write three percentages, e.g. 80/10/10")
        return cls(*parts, test_match=test_match)


# --------------------------------------------------------------------------- labelled products


@dataclass
class CatalogSet:
    """Labelled products of one taxonomy, with targets in the model's label order."""

    taxonomy: object  # model.taxonomy.Taxonomy
    skus: list[str]
    uris: list[str]
    versions: list[str | None]
    coarse: np.ndarray  # [N] int64, or [N, C] float32 multi-hot
    fine: np.ndarray
    colours: list[tuple[str, ...]]
    split: np.ndarray  # [N] of "train" | "val" | "test"
    skipped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.skus)

    def index(self, split: str) -> np.ndarray:
        return np.nonzero(self.split == split)[0]

    def counts(self) -> dict[str, int]:
        return {s: int((self.split == s).sum()) for s in SPLITS}


def model_taxonomy(settings: Settings, name: str):
    """The catalog's taxonomy ``name`` as the model's (coarse and fine levels; colour is not a head)."""
    from catalog.db import session_scope
    from catalog.labels import read_taxonomy
    from model.taxonomy import Taxonomy

    with session_scope(settings.database_url) as session:
        data = read_taxonomy(session, name).to_dict()
    levels = {k: v for k, v in data["levels"].items() if k in ("coarse", "fine")}
    if not levels.get("fine", {}).get("labels"):
        raise TrainingDataError(f"taxonomy {name!r} has no fine labels in the catalog; apply its file first")
    return Taxonomy.from_dict({"name": name, "levels": levels})


def load_catalog_set(settings: Settings, taxonomy, rule: SplitRule) -> CatalogSet:
    """Every product with fine truth of ``taxonomy`` (a model Taxonomy). Single-label: exactly one fine
    label, the coarse target its parent (a coarse truth that contradicts it skips the product, counted);
    multi-label: fine and coarse multi-hot (coarse = the truth's coarse labels and the fine labels' parents)."""
    from catalog.db import session_scope
    from catalog.truth import truth_rows

    fine_ix = {n: i for i, n in enumerate(taxonomy.fine.labels)}
    coarse_ix = {n: i for i, n in enumerate(taxonomy.coarse.labels)}
    multi = taxonomy.multi_label
    skus, uris, versions, coarse, fine, colours, split = [], [], [], [], [], [], []
    skipped: Counter = Counter()
    with session_scope(settings.database_url) as session:
        for row in truth_rows(session, taxonomy.name):
            f_names = row.labels.get("fine", [])
            c_names = row.labels.get("coarse", [])
            if not f_names:
                skipped["no fine truth"] += 1
                continue
            if any(n not in fine_ix for n in f_names) or any(n not in coarse_ix for n in c_names):
                skipped["label not in the model's taxonomy"] += 1
                continue
            if multi:
                fv = np.zeros(len(fine_ix), np.float32)
                fv[[fine_ix[n] for n in f_names]] = 1
                cv = np.zeros(len(coarse_ix), np.float32)
                for f in np.nonzero(fv)[0]:
                    cv[list(taxonomy.parents[f])] = 1
                cv[[coarse_ix[n] for n in c_names]] = 1
                fine.append(fv)
                coarse.append(cv)
            else:
                if len(f_names) != 1:
                    skipped["several fine labels (single-label taxonomy)"] += 1
                    continue
                f = fine_ix[f_names[0]]
                c = taxonomy.parents[f][0]
                if c_names and [coarse_ix[n] for n in c_names] != [c]:
                    skipped["coarse truth contradicts the fine label's parent"] += 1
                    continue
                fine.append(f)
                coarse.append(c)
            skus.append(row.sku)
            uris.append(row.image_uri)
            versions.append(row.image_version)
            colours.append(tuple(row.labels.get("colour", [])))
            split.append(rule.split_of(row.sku))
    if not skus:
        why = "; ".join(f"{k}: {v}" for k, v in skipped.items()) or "no product has truth labels of it"
        raise TrainingDataError(f"taxonomy {taxonomy.name!r}: no labelled product in the catalog ({why}); "
                                "import products with label:coarse / label:fine columns")
    c_arr = np.stack(coarse).astype(np.float32) if multi else np.asarray(coarse, dtype=np.int64)
    f_arr = np.stack(fine).astype(np.float32) if multi else np.asarray(fine, dtype=np.int64)
    return CatalogSet(taxonomy, skus, uris, versions, c_arr, f_arr, colours, np.asarray(split), dict(skipped))


# --------------------------------------------------------------------------- decoding, cached


def spec_digest(spec) -> str:
    """What decides the uint8 arrays: the spec without its normalisation (applied later, on tensors)."""
    d = {k: v for k, v in spec.to_dict().items() if k not in ("mean", "std")}
    blob = json.dumps({"spec": d, "v": CACHE_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cache_dir(settings: Settings) -> Path:
    return Path(settings.home) / "training-cache"


_W: dict = {}


def _init_decoder(settings: Settings, spec_dict: dict) -> None:
    from catalog.storage import ImageReader
    from model.preprocess import PreprocessSpec

    _W["reader"] = ImageReader.from_settings(settings)
    _W["spec"] = PreprocessSpec.from_dict(spec_dict)
    _W["max_pixels"] = settings.max_image_pixels


def _info(d) -> list:
    """What the preprocessing's analysis saw (``model.preprocess.Decoded``): ["colour|colour"] (the dominant
    colours the worker tags), as the cache stores it."""
    return ["|".join(n for n, _ in (d.colours or ()))]


def _decode_chunk(job: list[tuple[int, str]]) -> list[tuple[int, np.ndarray | None, object]]:
    from catalog.errors import failure_reason
    from model.preprocess import decode

    out = []
    for i, uri in job:
        try:
            data = _W["reader"].fetch(uri).data
            d = decode(data, _W["spec"], _W["max_pixels"], colours=not _W["spec"].is_legacy)
            out.append((i, d.array, _info(d)))
        except Exception as exc:  # noqa: BLE001 - one image's failure is that image's, counted by reason
            out.append((i, None, failure_reason(exc)))
    return out


def _save_cache(folder: Path, name: str, arrays: np.ndarray, keys: list[str], infos: list[list]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{name}.tmp.npy"
    np.save(tmp, arrays)
    os.replace(tmp, folder / f"{name}.npy")
    tmpk = folder / f".{name}.keys.tmp"
    tmpk.write_text(json.dumps([[k, *info] for k, info in zip(keys, infos, strict=True)]))
    os.replace(tmpk, folder / f"{name}.keys.json")


def _load_cache(folder: Path, name: str) -> tuple[np.ndarray | None, dict[str, int], list[list]]:
    try:
        rows = json.loads((folder / f"{name}.keys.json").read_text())
        arr = np.load(folder / f"{name}.npy", mmap_mode="r")
    except (OSError, ValueError):
        return None, {}, []
    if len(rows) != len(arr):
        return None, {}, []
    return arr, {r[0]: i for i, r in enumerate(rows)}, [list(r[1:]) for r in rows]


@dataclass
class Analysis:
    """Per image, what the preprocessing's analysis saw: the dominant colours the worker would tag
    (``model.preprocess.decode(..., colours=True)``)."""

    colours: list[list[str]]

    def subset(self, mask: np.ndarray) -> Analysis:
        return Analysis([self.colours[i] for i in np.nonzero(mask)[0]])


def _analysis(infos: list[list]) -> Analysis:
    return Analysis([i[0].split("|") if i and i[0] else [] for i in infos])


def decode_images(settings: Settings, uris: Sequence[str], versions: Sequence[str | None], spec, *,
                  procs: int = 2, progress: bool = True,
                  name: str = "catalog") -> tuple[np.ndarray, np.ndarray, Counter, Analysis]:
    """(uint8 [N, S, S, C] in the order given, ok mask [N], failure reasons, the analysis of each image) of
    the catalog images, through the cache: an image whose (URI, catalog version) was decoded before with
    the same spec is not read again. A failed image's row is zeros and ``ok`` False."""
    folder = cache_dir(settings) / spec_digest(spec)
    keys = [f"{u}\t{v or ''}" for u, v in zip(uris, versions, strict=True)]
    old, where, old_info = _load_cache(folder, name)
    shape = (spec.input_size, spec.input_size, spec.channels)
    out = np.zeros((len(keys), *shape), dtype=np.uint8)
    ok = np.zeros(len(keys), dtype=bool)
    infos: list[list] = [[] for _ in keys]
    todo: list[tuple[int, str]] = []
    for i, k in enumerate(keys):
        j = where.get(k)
        if j is not None and old is not None:
            out[i] = old[j]
            ok[i] = True
            infos[i] = old_info[j]
        else:
            todo.append((i, uris[i]))
    reasons: Counter = Counter()
    if todo:
        jobs = [todo[s : s + CHUNK] for s in range(0, len(todo), CHUNK)]
        results = pool_map(_decode_chunk, jobs, procs, _init_decoder, (settings, spec.to_dict()), total=len(todo),
                            desc=f"decode {name}", progress=progress)
        for i, arr, info in results:
            if arr is None:
                reasons[info] += 1
            else:
                out[i] = arr
                ok[i] = True
                infos[i] = info
        # keep what was cached before (other catalogs' images share the file) plus what is new
        keep_keys = [k for i, k in enumerate(keys) if ok[i]]
        keep_infos = [infos[i] for i in range(len(keys)) if ok[i]]
        keep = out[ok]
        if old is not None:
            have = set(keep_keys)
            extra = [k for k in where if k not in have]
            if extra:
                keep = np.concatenate([keep, np.stack([old[where[k]] for k in extra])])
                keep_keys += extra
                keep_infos += [old_info[where[k]] for k in extra]
        _save_cache(folder, name, keep, keep_keys, keep_infos)
    return out, ok, reasons, _analysis(infos)


# --------------------------------------------------------------------------- generated non-garments


def _init_outliers(spec_dict: dict) -> None:
    from model.preprocess import PreprocessSpec

    _W["spec"] = PreprocessSpec.from_dict(spec_dict)


def _outlier_chunk(job: tuple[tuple[str, ...], int, int, int]) -> list[tuple[int, np.ndarray, str, list]]:
    from model.outliers import render_outlier
    from model.preprocess import decode

    families, seed, start, stop = job
    out = []
    for i in range(start, stop):
        rng = np.random.default_rng([7, seed, i])
        o = render_outlier(rng, families=families)
        buf = io.BytesIO()
        o.image.save(buf, "JPEG", quality=int(rng.integers(75, 96)))
        d = decode(buf.getvalue(), _W["spec"], 40_000_000)
        out.append((i, d.array, o.family, _info(d)))
    return out


def _source_digest(*modules: str) -> str:
    h = hashlib.sha256()
    for m in modules:
        h.update(Path(__import__(m, fromlist=["_"]).__file__).read_bytes())
    return h.hexdigest()[:12]


def generated_outliers(settings: Settings, spec, n: int, families: Sequence[str], seed: int, *, procs: int = 2,
                       progress: bool = True) -> tuple[np.ndarray, list[str], Analysis]:
    """``n`` non-garment images of ``families`` (item i from ``default_rng([7, seed, i])``), JPEG-encoded
    and decoded with ``spec``, as uint8 arrays with their family names and analysis; cached per spec,
    families, seed and the generator's source."""
    shape = (spec.input_size, spec.input_size, spec.channels)
    if n <= 0:
        return np.zeros((0, *shape), np.uint8), [], _analysis([])
    families = tuple(families)
    tag = hashlib.sha256(json.dumps([families, seed, n, _source_digest("model.outliers", "model.render")])
                         .encode()).hexdigest()[:12]
    folder = cache_dir(settings) / spec_digest(spec)
    name = f"outliers-{tag}"
    arr, where, infos = _load_cache(folder, name)
    if arr is not None and len(arr) == n:
        return (np.asarray(arr), [k.split("\t", 1)[1] for k, _ in sorted(where.items(), key=lambda kv: kv[1])],
                _analysis(infos))
    jobs = [(families, seed, s, min(s + CHUNK, n)) for s in range(0, n, CHUNK)]
    results = sorted(pool_map(_outlier_chunk, jobs, procs, _init_outliers, (spec.to_dict(),), total=n,
                               desc="render non-garments", progress=progress), key=lambda r: r[0])
    images = np.stack([r[1] for r in results])
    names = [r[2] for r in results]
    infos = [r[3] for r in results]
    _save_cache(folder, name, images, [f"{i}\t{f}" for i, f in enumerate(names)], infos)
    return images, names, _analysis(infos)


def _robust_chunk(job: tuple[int, int, str | None]) -> list[tuple]:
    from model.fmnist import load_split
    from model.preprocess import decode
    from model.render import ROBUST_STYLE, render_photo

    start, stop, source = job
    if "fmnist" not in _W:
        _W["fmnist"] = load_split("test", source)[0]
    out = []
    for i in range(start, stop):
        rng = np.random.default_rng([9, i])
        p = render_photo(_W["fmnist"][i], rng, **ROBUST_STYLE)
        buf = io.BytesIO()
        p.image.save(buf, "JPEG", quality=int(rng.integers(70, 96)))
        d = decode(buf.getvalue(), _W["spec"], 40_000_000, colours=True)
        out.append((i, d.array, tuple(p.colours), _info(d)))
    return out


def robust_fashion_mnist(spec, n: int, *, source: str | None = None, procs: int = 2, progress: bool = True):
    """The first ``n`` Fashion-MNIST *test* items rendered by a deliberately different renderer
    (``model.render.ROBUST_STYLE``, other seeds, JPEG quality 70-95), decoded with ``spec``: (uint8 inputs,
    Fashion-MNIST labels, true colours, the analysis: frame and colours as the worker sees them)."""
    from model.fmnist import load_split

    labels = load_split("test", source)[1][:n].astype(np.int64)
    jobs = [(s, min(s + CHUNK, n), source) for s in range(0, n, CHUNK)]
    results = sorted(pool_map(_robust_chunk, jobs, procs, _init_outliers, (spec.to_dict(),), total=n,
                               desc="render robust test", progress=progress), key=lambda r: r[0])
    return np.stack([r[1] for r in results]), labels, [r[2] for r in results], _analysis([r[3] for r in results])


# --------------------------------------------------------------------------- colour truth vs prediction


def colour_report(truth: Sequence[Sequence[str]], predicted: Sequence[Sequence[str] | None]) -> dict:
    """The colours the worker tags (``model.preprocess.decode(..., colours=True)``) against the truth: primary
    colour accuracy (first predicted = first true), exact set match, and any-overlap rate, over
    the items that have colour truth."""
    pairs = [(list(t), p or []) for t, p in zip(truth, predicted, strict=True) if t]
    n = len(pairs)
    if n == 0:
        return {"n": 0}
    primary = sum(bool(p) and p[0] == t[0] for t, p in pairs)
    exact = sum(set(p) == set(t) for t, p in pairs)
    overlap = sum(bool(set(p) & set(t)) for t, p in pairs)
    single = [(t, p) for t, p in pairs if len(t) == 1]
    return {"n": n, "primary_accuracy": primary / n, "set_exact": exact / n, "any_overlap": overlap / n,
            "single_colour_n": len(single),
            "single_colour_primary_accuracy": (sum(bool(p) and p[0] == t[0] for t, p in single) / len(single))
            if single else None}
