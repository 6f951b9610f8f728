"""The storefront's drill-down: products carrying every selected style, best first, and the counts of the
next choice (fine styles and colours within the selection; coarse styles too when nothing is selected).

A selection is a list of style *names* at any level (``tops``, ``navy``); a product belongs to it when it
shows a tag of each (published, primary or secondary: a row of the ``storefront_tags`` view). The label ids
of a name are cached per database; the first statement of every call also reads the labels' generation
(how many labels, the highest id) and whether the cached ids still carry their names, so a taxonomy
change (new labels, the same names in a new taxonomy, a re-created database) is seen by that call, which
looks the names up again and runs once more.

Counts come from ``catalog.facets``, never from product rows:

* nothing or one style selected: one range of ``label_pairs`` (products per two labels);
* more: the sum over the tag sets containing every selected label (a few hundred on a million products).

Products come in order of their **browse score** (``product_tag_sets.confidence``: the mean score of the
product's published tags, every level, rounded to 6 decimals; ties by product id). The score is the same
whatever the selection, which is what lets an index serve any selection in order, keyset-paginated and
exact, by whichever of two plans reads fewer rows:

* **sets**: for each set of the selection, one index descent on (set_id, confidence DESC, product_id)
  taking at most ``limit + 1`` rows, merged (PostgreSQL: ``LATERAL``); cost grows with the sets;
* **walk**: the whole catalog in score order (index on confidence DESC, product_id, set_id), keeping the
  rows whose set is in the selection; cost grows as the selection's share of the catalog shrinks. The
  walk is capped; a page it does not fill (a selection rarer near the top than its counts said, or the
  last page) is served by the sets plan.

Every statement reads only the read-only views of migration 0003 (``storefront_styles``,
``storefront_style_pairs``, ``storefront_tag_sets``, ``storefront_tag_set_labels``,
``storefront_products``): a storefront connected as the storefront role runs these same queries.
``min_score`` keeps products whose browse score is at least that; the counts then come from the
selection's product rows (exact, and proportional to the selection's size).
"""

# ruff: noqa: S608 - the statements are built from constant fragments and placeholders; every value is bound

from __future__ import annotations

import threading
from collections import defaultdict
from functools import lru_cache

from sqlalchemy import Connection, bindparam, text

from catalog.errors import NotFound, StyletagError
from catalog.queries import MAX_PAGE, Reader, decode_cursor, encode_cursor

MAX_STYLES = 8
FACET_LEVELS = ("fine", "colour")
SET_DESCENT_ROWS = 20  # what one per-set index descent costs, in rows of the walk (measured: bench/queries.py)
WALK_CAP_FACTOR = 4  # the walk reads at most this many times the rows it expects
WALK_MIN_CAP = 1000

_RESOLVE = text(
    "SELECT label_id, style, (SELECT count(*) FROM storefront_styles) AS n, "
    "(SELECT max(label_id) FROM storefront_styles) AS top FROM storefront_styles WHERE style IN :names"
).bindparams(bindparam("names", expanding=True))
# (database URL, style name) -> (label ids, (labels, highest id) when they were read)
_cache: dict[tuple[str, str], tuple[tuple[int, ...], tuple[int, int]]] = {}
_cache_lock = threading.Lock()
# Keyset: after (c, p) in (confidence DESC, product_id) order; the first page passes c = 2 (above any score).
_AFTER = "m.confidence >= :min AND m.confidence <= :c AND (m.confidence < :c OR m.product_id > :p)"
_ORDER = "ORDER BY {t}.confidence DESC, {t}.product_id"
_TOTAL = "SELECT products FROM storefront_style_pairs WHERE within_id = 0 AND label_id = 0"


def _ids(groups: tuple[int, ...]) -> str:
    return ", ".join(f":l{i}_{j}" for i, k in enumerate(groups) for j in range(k))


def _check_columns(groups: tuple[int, ...]) -> str:
    """The labels' generation and how many selected ids still carry a selected name (Selection.check)."""
    names = ", ".join(f":n{i}" for i in range(len(groups)))
    return (f"(SELECT count(*) FROM storefront_styles) AS g_labels, (SELECT max(label_id) FROM storefront_styles) "
            f"AS g_top, (SELECT count(*) FROM storefront_styles WHERE label_id IN ({_ids(groups) or 'NULL'}) "
            f"AND style IN ({names or 'NULL'})) AS g_ok")


def _selection(groups: tuple[int, ...]) -> str:
    """CTEs ``sel`` (the ids of the sets holding every selected style) and ``ss`` (those with products)."""
    if not groups:
        sel = "sel AS (SELECT set_id FROM storefront_tag_sets WHERE products > 0)"
    elif all(k == 1 for k in groups):  # one label a name: the sorted set lists of the labels, merge-joined
        joins = " ".join(f"JOIN storefront_tag_set_labels x{i} ON x{i}.set_id = x0.set_id AND x{i}.label_id = :l{i}_0"
                         for i in range(1, len(groups)))
        sel = f"sel AS (SELECT x0.set_id FROM storefront_tag_set_labels x0 {joins} WHERE x0.label_id = :l0_0)"
    else:  # a name of several labels (several taxonomies): any of them
        cases = " ".join(f"WHEN label_id IN ({', '.join(f':l{i}_{j}' for j in range(k))}) THEN {i}"
                         for i, k in enumerate(groups))
        sel = (f"sel AS (SELECT set_id FROM storefront_tag_set_labels WHERE label_id IN ({_ids(groups)}) "
               f"GROUP BY set_id HAVING count(DISTINCT CASE {cases} END) = {len(groups)})")
    # a set whose products all moved away keeps its labels: products > 0 leaves it out
    return (f"{sel}, ss AS (SELECT t.set_id, t.products FROM sel JOIN storefront_tag_sets t ON t.set_id = sel.set_id "
            "WHERE t.products > 0)")


@lru_cache(maxsize=64)
def _facets_statement(groups: tuple[int, ...], min_score: bool) -> text:
    """Counts within a selection of ``len(groups)`` names, each ``groups[i]`` label ids, by its sets (or,
    with a minimum score, by its product rows); plus rows 's' (the selection's size) and 'g' (the check)."""
    counted = ("ss" if not min_score else
               "(SELECT m.set_id, count(*) AS products FROM storefront_products m WHERE m.set_id IN "
               "(SELECT set_id FROM sel) AND m.confidence >= :min GROUP BY m.set_id)")
    return text(
        f"WITH {_selection(groups)}, counted AS (SELECT * FROM {counted} c), "
        "agg AS (SELECT y.label_id, sum(c.products) AS products FROM counted c "
        "JOIN storefront_tag_set_labels y ON y.set_id = c.set_id GROUP BY y.label_id) "
        "SELECT 'f' AS kind, s.label_id, s.taxonomy, s.level, s.style, s.position, agg.products "
        "FROM agg JOIN storefront_styles s ON s.label_id = agg.label_id "
        "UNION ALL SELECT 's', NULL, NULL, NULL, NULL, NULL, sum(products) FROM counted "
        f"UNION ALL SELECT 'g', g_labels, NULL, NULL, NULL, g_ok, g_top FROM (SELECT {_check_columns(groups)}) g"
    )


@lru_cache(maxsize=64)
def _page_statement(groups: tuple[int, ...], pg: bool) -> text:
    """One page of a selection of ``len(groups)`` names in one statement: the selection's size decides
    the plan (``walk`` or ``sets``, see the module docstring; the walk is capped and a page it does not
    fill is served by the sets plan); each row says which plan served it, and carries the check columns."""
    if groups in ((1,), (1, 1)):  # one or two labels: the size from label_pairs, no set row read
        other = ":l1_0" if len(groups) == 2 else ":l0_0"
        stats = ("SELECT (SELECT count(*) FROM sel) AS sets, COALESCE((SELECT products FROM storefront_style_pairs "
                 f"WHERE within_id = :l0_0 AND label_id = {other}), 0) AS selected, ({_TOTAL}) AS catalog")
    else:
        stats = f"SELECT count(*) AS sets, COALESCE(sum(products), 0) AS selected, ({_TOTAL}) AS catalog FROM ss"
    least = "CASE WHEN selected < sets * :lim THEN selected ELSE sets * :lim END"
    if pg:  # per set at most :lim rows, merged
        sets_plan = ("SELECT x.product_id, x.confidence FROM ss CROSS JOIN LATERAL (SELECT m.product_id, m.confidence "
                     f"FROM storefront_products m WHERE m.set_id = ss.set_id AND {_AFTER} {_ORDER.format(t='m')} "
                     f"LIMIT :lim) x WHERE (SELECT n FROM wn) < :lim {_ORDER.format(t='x')} LIMIT :lim")
    else:
        sets_plan = ("SELECT m.product_id, m.confidence FROM storefront_products m WHERE (SELECT n FROM wn) < :lim "
                     f"AND m.set_id IN (SELECT set_id FROM ss) AND {_AFTER} {_ORDER.format(t='m')} LIMIT :lim")
    return text(
        f"WITH {_selection(groups)}, st AS ({stats}), "
        f"plan AS (SELECT selected > 0 AND :lim * catalog <= selected * (sets * :k + {least}) AS walk, "
        "CASE WHEN selected > 0 THEN (:factor * :lim * catalog) / selected + :mincap ELSE 0 END AS cap FROM st), "
        # ``IS TRUE`` keeps the set test a filter of the ordered index walk (a semi-join would sort)
        # (the gate stays outside the scan: inside, it would keep the view's products join from being removed)
        "w AS (SELECT m.product_id, m.confidence FROM (SELECT m.product_id, m.confidence, m.set_id "
        f"FROM storefront_products m WHERE {_AFTER} {_ORDER.format(t='m')} LIMIT (SELECT cap FROM plan)) m "
        "WHERE (SELECT walk FROM plan) AND (m.set_id IN (SELECT set_id FROM sel)) IS TRUE "
        f"{_ORDER.format(t='m')} LIMIT :lim), "
        "wn AS (SELECT count(*) AS n FROM w), "
        f"x AS ({sets_plan}), "
        "r AS (SELECT product_id, confidence FROM w WHERE (SELECT n FROM wn) >= :lim "
        "UNION ALL SELECT product_id, confidence FROM x) "
        "SELECT r.product_id, r.confidence, d.sku, d.title, d.image_uri, "
        "CASE WHEN (SELECT n FROM wn) >= :lim THEN 'walk' ELSE 'sets' END AS plan, "
        f"{_check_columns(groups)} FROM r JOIN storefront_products d ON d.product_id = r.product_id "
        + _ORDER.format(t="r")
    )


_PAGE_ALL = text(
    "SELECT r.product_id, r.confidence, d.sku, d.title, d.image_uri FROM (SELECT m.product_id, m.confidence "
    f"FROM storefront_products m WHERE {_AFTER} {_ORDER.format(t='m')} LIMIT :lim) r "
    "JOIN storefront_products d ON d.product_id = r.product_id " + _ORDER.format(t="r")
)


# One style (one label) selected: the pairs of that label, and its own row (the selection's size).
_PAIR_CHECK = ("(SELECT count(*) FROM storefront_styles) AS g_labels, (SELECT max(label_id) FROM storefront_styles) "
               "AS g_top, (SELECT count(*) FROM storefront_styles WHERE label_id = :w AND style = :n0) AS g_ok")
_PAIR_FACETS = text(
    "SELECT 'f' AS kind, s.label_id, s.taxonomy, s.level, s.style, s.position, c.products "
    "FROM storefront_style_pairs c JOIN storefront_styles s ON s.label_id = c.label_id "
    "WHERE c.within_id = :w AND c.products > 0 "
    "UNION ALL SELECT 's', NULL, NULL, NULL, NULL, NULL, "
    "(SELECT products FROM storefront_style_pairs WHERE within_id = :w AND label_id = :w) "
    f"UNION ALL SELECT 'g', g_labels, NULL, NULL, NULL, g_ok, g_top FROM (SELECT {_PAIR_CHECK}) g"
)
_CATALOG_FACETS = text(
    "SELECT 'f' AS kind, s.label_id, s.taxonomy, s.level, s.style, s.position, s.products FROM storefront_styles s "
    "WHERE s.products > 0 "
    f"UNION ALL SELECT 's', NULL, NULL, NULL, NULL, NULL, products FROM ({_TOTAL}) total"
)


def _url(session: Reader) -> str:
    bind = session.engine if isinstance(session, Connection) else session.get_bind()
    return bind.url.render_as_string(hide_password=True)


class Selection:
    """Style names resolved to label ids (cached per database), and the bind parameters of the statements
    above. :meth:`check` says whether a statement's generation columns still match what was cached."""

    def __init__(self, session: Reader, styles, refresh: bool = False) -> None:
        names = list(dict.fromkeys(str(s).strip() for s in (styles or ())))
        if any(not n for n in names):
            raise StyletagError("a style name is empty; pass names such as --style tops --style navy")
        if len(names) > MAX_STYLES:
            raise StyletagError(f"at most {MAX_STYLES} styles at once, got {len(names)}")
        self.names = names
        url = _url(session)
        cached = [None if refresh else _cache.get((url, n)) for n in names]
        self.fresh = any(c is None for c in cached) or len({c[1] for c in cached}) > 1
        if self.fresh and names:
            ids: dict[str, list[int]] = defaultdict(list)
            generation = (0, 0)
            for label_id, style, n, top in session.execute(_RESOLVE, {"names": names}):
                ids[style].append(int(label_id))
                generation = (int(n), int(top))
            for name in names:
                if not ids[name]:
                    raise NotFound(f"no style {name[:80]!r}; 'styletag facets' lists the styles")
            cached = [(tuple(sorted(ids[n])), generation) for n in names]
            with _cache_lock:
                if len(_cache) > 10_000:
                    _cache.clear()
                _cache.update({(url, n): c for n, c in zip(names, cached, strict=True)})
        self.ids = [c[0] for c in cached]
        self.generation = cached[0][1] if cached else (0, 0)
        self.groups = tuple(len(i) for i in self.ids)
        self.params = {f"l{i}_{j}": lid for i, group in enumerate(self.ids) for j, lid in enumerate(group)}
        self.params.update({f"n{i}": n for i, n in enumerate(names)})

    @property
    def one_label(self) -> int | None:
        """The label id when the selection is nothing (0) or one style that is one label."""
        if not self.groups:
            return 0
        return self.ids[0][0] if self.groups == (1,) else None

    def check(self, labels, ok, top) -> bool:
        """Whether the labels are as they were when the ids were cached (no label added, each id still
        carrying its name). Only ever False for ids read before this call."""
        return not self.names or (int(labels or 0), int(top or 0)) == self.generation and int(ok or 0) == sum(
            self.groups)


def _check(min_score: float, limit: int = 1) -> None:
    if not 0 <= min_score <= 1:  # NaN too
        raise StyletagError(f"min_score must be a number between 0 and 1, got {min_score!r}")
    if not 1 <= limit <= MAX_PAGE:
        raise StyletagError(f"limit must be between 1 and {MAX_PAGE}")


def facets_within(session: Reader, styles=(), min_score: float = 0.0) -> dict:
    """Counts for the next choice within the selection ``styles`` (names, any level): how many products
    the selection holds (``products``), and per fine style and colour (per coarse style too when nothing
    is selected) how many of them show it, most first, the selected styles left out. Products with a
    browse score under ``min_score`` are not counted."""
    _check(min_score)
    return _facets(session, styles, min_score)


def _facets(session: Reader, styles, min_score: float, refresh: bool = False) -> dict:
    sel = Selection(session, styles, refresh)
    if min_score > 0:
        rows = session.execute(_facets_statement(sel.groups, True), {**sel.params, "min": min_score}).all()
    elif not sel.names:
        rows = session.execute(_CATALOG_FACETS).all()
    elif sel.one_label is not None:
        rows = session.execute(_PAIR_FACETS, {"w": sel.one_label, "n0": sel.names[0]}).all()
    else:
        rows = session.execute(_facets_statement(sel.groups, False), sel.params).all()
    check = next((r for r in rows if r.kind == "g"), None)
    if check is not None and not sel.check(check.label_id, check.position, check.products):
        if sel.fresh:  # changed between the lookup and the query: the next call looks again
            _forget(session, sel.names)
        else:
            return _facets(session, styles, min_score, refresh=True)
    levels = FACET_LEVELS if sel.names else ("coarse", *FACET_LEVELS)
    out: dict[str, list[tuple]] = {level: [] for level in levels}
    total = 0
    for r in rows:
        if r.kind == "s":
            total = int(r.products or 0)
        elif r.kind == "f" and r.level in out and r.style not in sel.names and r.products:
            out[r.level].append((-int(r.products), r.taxonomy, r.position, r.style))
    return {"styles": sel.names, "min_score": min_score, "products": total,
            "facets": {level: [{"taxonomy": t, "style": s, "count": -n} for n, t, _, s in sorted(items)]
                       for level, items in out.items()}}


def _forget(session: Reader, names: list[str]) -> None:
    url = _url(session)
    with _cache_lock:
        for name in names:
            _cache.pop((url, name), None)


def browse_page(session: Reader, styles=(), min_score: float = 0.0, limit: int = 50,
                after: str | None = None) -> tuple[list[dict], str | None]:
    """One page of the products showing every style of ``styles``, best browse score first (ties by
    product id), and the cursor of the next page (None on the last one)."""
    _check(min_score, limit)
    return _page(session, styles, min_score, limit, after)


def _page(session: Reader, styles, min_score: float, limit: int, after: str | None,
          refresh: bool = False) -> tuple[list[dict], str | None]:
    c, p = decode_cursor(after) if after else (2.0, 0)
    sel = Selection(session, styles, refresh)
    params = {**sel.params, "min": min_score, "c": c, "p": p, "lim": limit + 1}
    if not sel.names:
        rows = session.execute(_PAGE_ALL, params).all()
    else:
        bind = session if isinstance(session, Connection) else session.get_bind()
        stmt = _page_statement(sel.groups, bind.dialect.name == "postgresql")
        rows = session.execute(stmt, {**params, "k": SET_DESCENT_ROWS, "factor": WALK_CAP_FACTOR,
                                      "mincap": WALK_MIN_CAP}).all()
        stale = not rows or not sel.check(rows[0].g_labels, rows[0].g_ok, rows[0].g_top)
        if stale and not sel.fresh:  # an empty page or a changed taxonomy: look the names up again
            return _page(session, styles, min_score, limit, after, refresh=True)
        if stale and rows:
            _forget(session, sel.names)
    page = rows[:limit]
    items = [{"sku": r.sku, "title": r.title, "image_uri": r.image_uri, "product_id": r.product_id,
              "score": r.confidence} for r in page]
    next_cursor = encode_cursor(page[-1].confidence, page[-1].product_id) if len(rows) > limit else None
    return items, next_cursor


def browse(session: Reader, styles=(), min_score: float = 0.0, limit: int = 50, after: str | None = None) -> dict:
    """The drill-down in one call: :func:`facets_within` (``styles``, ``products``, ``facets``) and
    :func:`browse_page` (``items``, ``next_cursor``) of the same selection."""
    _check(min_score, limit)
    result = _facets(session, styles, min_score)
    if result["products"]:
        items, next_cursor = _page(session, styles, min_score, limit, after)
    else:
        items, next_cursor = [], None
        if after:
            decode_cursor(after)  # a bad cursor is an error on an empty selection too
    return {**result, "items": items, "next_cursor": next_cursor}
