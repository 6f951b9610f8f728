"""``styletag report RUN_ID --html out.html``: one self-contained HTML page about a tagging run.

What is in it: the run's counts, throughput over time (from ``tag_state.updated_at`` of the run's
products, bucketed), failures by reason with example SKUs, the distribution of primary coarse and
fine styles, agreement with human-verified labels where there are any, and a grid of example
thumbnails per fine style with their scores (the most and the least confident).

Self-contained: CSS inline, charts and thumbnails as base64 PNG ``data:`` URIs (matplotlib's Agg
backend, Pillow), no script and no external reference, so the file can be mailed or attached to a
ticket. Images are fetched through :class:`catalog.storage.ImageReader` with the configured allowed
prefixes and size limit, exactly as a worker reads them. Every catalog string is HTML-escaped.

What the page shows is read by ``catalog.reports.collect`` (the read model); this module only renders.
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import asdict
from datetime import UTC, datetime

import click

from catalog.errors import StyletagError
from catalog.reports import Example, ReportData, collect
from catalog.settings import Settings

PALETTE = ("#4269d0", "#efb118", "#ff725c", "#6cc5b0", "#3ca951", "#ff8ab7", "#a463f2", "#97bbf5", "#9c6b4e",
           "#9498a0")


# --- rendering -------------------------------------------------------------------------------------


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "axes.spines.top": False, "axes.spines.right": False})
    return plt


def throughput_chart(data: ReportData) -> str | None:
    if not data.series:
        return None
    plt = _plt()
    minutes = data.span_s > 600
    scale = 60.0 if minutes else 1.0
    xs = [t / scale for t, _, _ in data.series]
    tagged = [n / data.bucket_s for _, n, _ in data.series]
    failed = [n / data.bucket_s for _, _, n in data.series]
    fig, ax = plt.subplots(figsize=(10, 2.8))
    width = data.bucket_s / scale * 0.9
    ax.bar(xs, tagged, width=width, align="edge", color=PALETTE[0], label="tagged")
    ax.bar(xs, failed, width=width, align="edge", bottom=tagged, color=PALETTE[2], label="failed")
    ax.set_xlabel(f"{'minutes' if minutes else 'seconds'} since the run started ({data.bucket_s} s buckets)")
    ax.set_ylabel("images/s")
    # Products finished so far: smooth where the bars show each written batch.
    done, cumulative = 0, []
    for _, t, f in data.series:
        done += t + f
        cumulative.append(done)
    ax2 = ax.twinx()
    ax2.plot([x + width / 0.9 for x in xs], cumulative, color="#5b6275", linewidth=1.5, label="finished so far")
    ax2.set_ylim(bottom=0)
    ax2.set_ylabel("products finished")
    ax2.spines["right"].set_visible(True)
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], frameon=False, loc="lower left",
              bbox_to_anchor=(0, 1.0), ncol=3)
    return _png(fig)


def distribution_chart(rows: list[dict], title: str, colors: list[str]) -> str | None:
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.8, 0.32 * len(rows) + 0.8))
    names = [r["name"] for r in rows][::-1]
    counts = [r["count"] for r in rows][::-1]
    bars = ax.barh(names, counts, color=colors[::-1])
    ax.bar_label(bars, padding=3, fontsize=8)
    ax.set_title(title, loc="left", fontsize=10)
    ax.set_xlabel("products (primary tag)")
    ax.margins(x=0.15)
    return _png(fig)


def thumbnails(examples: list[Example], reader, size: int = 96, threads: int = 8) -> dict[str, str | None]:
    """URI -> PNG data URI of a thumbnail, or None when the image cannot be read."""
    from PIL import Image, ImageOps

    uris = list(dict.fromkeys(e.uri for e in examples))
    out: dict[str, str | None] = {}
    for uri, data in zip(uris, reader.get_many(uris, max_workers=threads), strict=True):
        if isinstance(data, Exception):
            out[uri] = None
            continue
        try:
            with Image.open(io.BytesIO(data)) as img:
                if img.width * img.height > 40_000_000:
                    raise ValueError("too many pixels")
                img.draft("RGB", (size, size))
                thumb = ImageOps.exif_transpose(img).convert("RGB")
                thumb = ImageOps.contain(thumb, (size, size), Image.Resampling.LANCZOS)
                buf = io.BytesIO()
                thumb.save(buf, format="PNG", optimize=True)
            out[uri] = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
        except Exception:  # noqa: BLE001 - a broken image gets a placeholder, not a failed report
            out[uri] = None
    return out


CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d2330;margin:0;background:#f4f5f8}
main{max-width:1120px;margin:0 auto;padding:24px}
h1{font-size:24px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 10px}h3{font-size:15px;margin:18px 0 8px}
.meta{color:#5b6275}.badge{display:inline-block;padding:2px 8px;border-radius:10px;font-size:12px;
background:#e1e7f5;color:#2b4a9b;vertical-align:middle}.badge.done{background:#dcf2e3;color:#17683a}
.badge.cancelled{background:#f8e0dc;color:#8a2a1a}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(160px,1fr));gap:12px;margin-top:16px}
.card{background:#fff;border-radius:8px;padding:12px 14px;box-shadow:0 1px 2px rgba(0,0,0,.08)}
.card .v{font-size:22px;font-weight:600}.card .k{color:#5b6275;font-size:12px}
.panel{background:#fff;border-radius:8px;padding:14px;box-shadow:0 1px 2px rgba(0,0,0,.08)}
.row{display:flex;gap:16px;flex-wrap:wrap}.row .panel{flex:1 1 420px}
img.chart{max-width:100%;height:auto}
table{border-collapse:collapse;width:100%;background:#fff}th,td{text-align:left;padding:6px 10px;
border-bottom:1px solid #e6e8ee;vertical-align:top}th{font-size:12px;color:#5b6275;font-weight:600}
td.n{white-space:nowrap;text-align:right}
code{font-size:12px;background:#f0f2f6;padding:1px 4px;border-radius:3px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(118px,1fr));gap:10px}
.thumb{background:#fff;border-radius:6px;padding:8px;text-align:center;box-shadow:0 1px 2px rgba(0,0,0,.08);
font-size:11px}.thumb img,.thumb .missing{width:96px;height:96px;display:block;margin:0 auto 6px;
border-radius:4px;background:#eef0f4}.thumb .missing{line-height:96px;color:#8a90a0}
.thumb.low{outline:2px dashed #efb118}.sku{font-family:ui-monospace,monospace;overflow-wrap:anywhere}
.score{font-weight:600}.muted{color:#8a90a0}footer{color:#8a90a0;font-size:12px;margin:32px 0 8px}
"""


def _e(value) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _card(label: str, value) -> str:
    return f'<div class="card"><div class="v">{_e(value)}</div><div class="k">{_e(label)}</div></div>'


def render_html(data: ReportData, thumbs: dict[str, str | None]) -> str:
    run, c = data.run, data.counts
    finished = c["tagged"] + c["failed"]
    rate = finished / data.span_s if data.span_s > 0 else 0.0
    peak = max(((t + f) / data.bucket_s for _, t, f in data.series), default=0.0)
    parts = [f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>styletag run {run['id']}</title>"
             f"<meta name=viewport content='width=device-width,initial-scale=1'><style>{CSS}</style></head><body><main>",
             f"<h1>Tagging run {run['id']} <span class=\"badge {_e(run['status'])}\">{_e(run['status'])}</span></h1>",
             f"<div class=meta>{_e(run['kind'])} · scope {_e(run['scope'])} · model <code>{_e(run['model_version'])}"
             f"</code> · taxonomy {_e(data.taxonomy or '?')} · started {_e(run['created_at'])} · finished "
             f"{_e(run['finished_at'] or '—')}</div>", '<div class="cards">']
    parts += [_card("products in the run", f"{c['total']:,}"), _card("written", f"{c['tagged']:,}"),
              _card("of which held for review", f"{c.get('review', 0):,}"), _card("skipped", f"{c.get('skipped', 0):,}"),
              _card("failed", f"{c['failed']:,}"), _card("remaining", f"{c['remaining']:,}"),
              _card("review queue now", f"{c.get('review_queue', 0):,}"),
              _card("mean images/s", f"{rate:,.1f}"), _card(f"peak images/s ({data.bucket_s} s)", f"{peak:,.1f}")]
    for level in ("coarse", "fine"):
        if level in data.agreement and data.agreement[level][1]:
            m, n = data.agreement[level]
            parts.append(_card(f"{level} agrees with human labels ({n:,})", f"{100 * m / n:.1f} %"))
    parts.append("</div><h2>Throughput over time</h2>")
    chart = throughput_chart(data)
    parts.append(f'<div class=panel><img class=chart alt="throughput over time" src="{chart}"></div>' if chart
                 else "<p class=muted>No product of this run has been written yet.</p>")

    parts.append("<h2>Failures by reason</h2>")
    if data.failures:
        parts.append("<table><tr><th>reason</th><th>products</th><th>share</th><th>example SKUs</th>"
                     "<th>first error</th></tr>")
        for f in data.failures:
            share = f"{100 * f['count'] / finished:.2f} %" if finished else ""
            skus = ", ".join(f"<span class=sku>{_e(x['sku'])}</span>" for x in f["examples"])
            first = _e(f["examples"][0]["error"]) if f["examples"] else ""
            parts.append(f"<tr><td><code>{_e(f['reason'])}</code></td><td class=n>{f['count']:,}</td><td class=n>{share}</td>"
                         f"<td>{skus}</td><td class=muted>{first}</td></tr>")
        parts.append("</table><p class=muted>Re-run them after fixing the cause: <code>styletag retag --resume "
                     f"{run['id']}</code></p>")
    else:
        parts.append("<p class=muted>No failures.</p>")

    parents = {r["name"]: i for i, r in enumerate(data.coarse)}
    coarse_colors = [PALETTE[i % len(PALETTE)] for i in range(len(data.coarse))]
    fine_colors = [PALETTE[parents.get(r["parent"], 0) % len(PALETTE)] for r in data.fine]
    parts.append('<h2>Style distribution</h2><div class="row">')
    for rows, title, colors in ((data.coarse, "coarse", coarse_colors), (data.fine, "fine", fine_colors)):
        chart = distribution_chart(rows, f"{title} styles", colors)
        if chart:
            parts.append(f'<div class=panel><img class=chart alt="{title} style distribution" src="{chart}"></div>')
    parts.append("</div>")

    parts.append("<h2>Examples per fine style</h2><p class=muted>The most confident primary tags of each fine "
                 "style, then (dashed) the least confident. Scores: fine / coarse.</p>")
    for row in data.fine:
        items = data.examples.get(row["name"], [])
        mean = f", mean score {row['mean_score']:.3f}" if row["mean_score"] is not None else ""
        parts.append(f"<h3>{_e(row['name'])} <span class=muted>({_e(row['parent'])}) · {row['count']:,} "
                     f"products{mean}</span></h3>")
        if not items:
            parts.append("<p class=muted>No product of this run has this primary style.</p>")
            continue
        parts.append('<div class="grid">')
        for ex in items:
            src = thumbs.get(ex.uri)
            img = (f'<img alt="{_e(ex.sku)}" src="{src}">' if src else '<div class="missing">no image</div>')
            cscore = f" / {ex.coarse_score:.2f}" if ex.coarse_score is not None else ""
            parts.append(f'<div class="thumb{" low" if ex.least_confident else ""}" title="{_e(ex.title)}">{img}'
                         f'<div class=sku>{_e(ex.sku)}</div><div><span class=score>{ex.score:.3f}</span>'
                         f'<span class=muted>{_e(cscore)} {_e(ex.coarse)}</span></div></div>')
        parts.append("</div>")
    parts.append(f"<footer>styletag report · generated {datetime.now(UTC).replace(microsecond=0).isoformat()}"
                 "</footer></main></body></html>")
    return "\n".join(parts)


def write_report(settings: Settings, run_id: int, path: str, *, examples: int = 6) -> ReportData:
    from catalog.storage import ImageReader

    data = collect(settings.database_url, run_id, examples=examples)
    reader = ImageReader.from_settings(settings)
    thumbs = thumbnails([e for items in data.examples.values() for e in items], reader,
                        threads=max(1, min(settings.fetch_threads, 16)))
    page = render_html(data, thumbs)
    try:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(page)
    except OSError as exc:
        raise StyletagError(f"cannot write the report to {path}: {exc.strerror or exc.__class__.__name__}") from None
    return data


def summary_dict(data: ReportData) -> dict:
    out = asdict(data)
    out["examples"] = {k: [asdict(e) for e in v] for k, v in data.examples.items()}
    return out


@click.command("report")
@click.argument("run_id", type=int)
@click.option("--html", "html_path", type=click.Path(dir_okay=False), default=None,
              help="Write the self-contained HTML page here.")
@click.option("--examples", type=click.IntRange(0, 50), default=6, show_default=True,
              help="Most confident example thumbnails per fine style.")
@click.option("--json", "as_json", is_flag=True, help="Print the report's data as JSON.")
def report_cmd(run_id: int, html_path: str | None, examples: int, as_json: bool) -> None:
    """A run's report: counts, throughput, failures, style distribution and example thumbnails."""
    settings = Settings.from_env()
    if html_path:
        data = write_report(settings, run_id, html_path, examples=examples)
        click.echo(f"run {run_id}: report written to {html_path}", err=as_json)
    else:
        data = collect(settings.database_url, run_id, examples=examples)
    if as_json:
        click.echo(json.dumps(summary_dict(data), default=str))
    elif not html_path:
        c = data.counts
        click.echo(f"run {run_id} ({data.run['status']}): {c['tagged']} written ({c.get('review', 0)} held for "
                   f"review), {c.get('skipped', 0)} skipped, {c['failed']} failed of {c['total']}, {c['remaining']} "
                   f"remaining; review queue {c.get('review_queue', 0)}")
        for f in data.failures:
            click.echo(f"  {f['reason']:<16} {f['count']:>8}  e.g. {', '.join(x['sku'] for x in f['examples'][:3])}")
