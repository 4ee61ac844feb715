"""The whole figure set for one or many tokenizer runs, in one folder with an ``index.html``.

Layout of ``out_dir`` (one subfolder per run, so that sweeps compare side by side):

- ``<run name>/tsne.{png,pdf}``      Fig. 5a, all depths in one t-SNE map
- ``<run name>/clusters.{png,pdf}``  Fig. 6, K-means cluster grids at the requested depths (those <= L)
- ``<run name>/nmi.{png,pdf}``       NMI between clusters and each factor, every depth
- ``<run name>/probes_<pooling>.{png,pdf}``     linear probes per depth and factor, one panel per view
  (:mod:`analysis.probes`; pooling ``mean``, ``max``, ``fg`` and ``pos`` for per-position features)
- ``<run name>/nmi_views_<pooling>.{png,pdf}``  NMI per depth and factor for every view of that pooling
- ``depth_curves.{png,pdf}``         Fig. 5b across all runs (runs sharing Lpix/Lsem: mean and min-max band)
- ``ablation.md``, ``ablation.csv``  one row per run
- ``nmi.json``                       {run name: {lpix, lsem, k, seed, split, n_images, nmi: {factor: [v_1..v_L]}}}
- ``probes.json``                    {run name: probes, NMI and crossover per view (schema: :mod:`analysis.probes`)}
- ``index.html``                     every PNG and the table on one page

Per-depth curves come from each run's ``metrics.json``; a curve metric it lacks (or the whole file) is
computed from the cached feature arrays (:func:`analysis.depth_curves.feature_depth_metrics`) and the
page says which numbers came from where. The table prefers metrics.json (``per_depth`` at Lpix/Lsem, then
its scalars such as ``val_psnr``) and falls back to the feature numbers. A run folder name that repeats gets its parent's name prepended.
A run may also be given as a features ``.npz`` (then no checkpoint is needed).

``view`` / ``pooling`` choose the feature of the t-SNE map (that view's per-position features), the cluster
grids and ``nmi.png`` / ``nmi.json`` (default: cumulative z_l, mean-pooled, as in the paper); ``probes=False``
skips the probe set, ``probes="all"`` adds the per-position probes (slow: one row per image and position). A features file of an older format gets probes for the views it holds.
"""

from __future__ import annotations

import json
from html import escape
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from analysis.depth_curves import CURVE_METRICS, feature_depth_metrics, plot_depth_curves
from analysis.extract import POSITION, extract, load_features, view_array
from analysis.kmeans import cluster_depths, nmi_per_depth, plot_cluster_grids, plot_nmi
from analysis.plotting import save_figure
from analysis.probes import analyse_views, crossover_lines, figures_by_pooling, to_json
from analysis.tables import ablation_rows, ablation_table, scalar, table_html
from analysis.tsne import depth_index, plot_tsne, subsample_positions, tsne_embed

DEFAULT_DEPTHS = (1, 4, 8, 16)


def _run_folder(run: Path) -> Path:
    """The run folder of a run folder, a .ckpt (``<run>/checkpoints/x.ckpt``) or a features .npz (``<run>/analysis/x.npz``)."""
    if run.suffix in (".ckpt", ".npz"):
        return run.parent.parent if run.parent.name in ("checkpoints", "analysis") else run.parent
    return run


def _unique_names(runs: Sequence[Path]) -> list[str]:
    """Run folder names; a repeated name gets the nearest distinguishing parent folder names prepended
    (stage folders such as ``tokenizer`` are skipped): ``sweep_a/tokenizer/seed0`` -> ``sweep_a_seed0``."""
    from evotok.stages import STAGE_NAMES

    folders = [_run_folder(r).resolve() for r in runs]
    parents = [[p.name for p in f.parents if p.name and p.name not in STAGE_NAMES] for f in folders]
    names = [f.name or "run" for f in folders]
    used = [0] * len(names)
    while True:
        dup = [i for i, n in enumerate(names) if names.count(n) > 1 and used[i] < len(parents[i])]
        if not dup:
            break
        for i in dup:
            names[i] = f"{parents[i][used[i]]}_{names[i]}"
            used[i] += 1
    out: list[str] = []
    for i, n in enumerate(names):
        out.append(n if n not in out else f"{n}_{i + 1}")
    return out


def _read_metrics(folder: Path) -> dict[str, Any]:
    path = folder / "metrics.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}


def make_figures(
    runs: Sequence[str | Path],
    out_dir: str | Path,
    split: str = "val",
    n_images: int = 512,
    depths: Sequence[int] = DEFAULT_DEPTHS,
    seed: int = 0,
    k: int = 8,
    n_positions: int = 2000,
    tsne_points: int = 3000,
    tsne_max_iter: int = 1000,
    n_per_cluster: int = 8,
    data_overrides: Sequence[str] = (),
    device: str = "auto",
    view: str = "z",
    pooling: str = "mean",
    probes: bool | str = True,
) -> Path:
    """Extract (cached) and draw the figure set described in the module docstring; returns ``index.html``."""
    if not runs:
        raise ValueError("make_figures needs at least one run")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [Path(r) for r in runs]
    names = _unique_names(paths)
    curve_runs: list[dict[str, Any]] = []
    table_runs: list[dict[str, Any]] = []
    nmi_all: dict[str, Any] = {}
    probes_all: dict[str, Any] = {}
    sections: list[str] = []
    notes: list[str] = []
    for name, path in zip(names, paths):
        feats_path = path if path.suffix == ".npz" else extract(
            path, split=split, n_images=n_images, n_positions=n_positions, seed=seed,
            data_overrides=data_overrides, device=device)
        feats = load_features(feats_path)
        lpix, lsem, L = feats["lpix"], feats["lsem"], feats["L"]
        run_out = out / name
        figs: list[tuple[str, str]] = []
        extra: list[str] = []
        feat_name = "$z_l$" if view == "z" else f"view '{view}'"
        pooled = view_array(feats, view, pooling)

        pos = subsample_positions(view_array(feats, view, POSITION), tsne_points, seed)
        emb = tsne_embed(pos, seed=seed, max_iter=tsne_max_iter)
        fig = plot_tsne(emb, depth_index(pos.shape[0], pos.shape[1]), lpix, lsem,
                        title=f"{name}: t-SNE of {feat_name}, all depths ($L_{{pix}}$={lpix}, $L_{{sem}}$={lsem})")
        save_figure(fig, run_out, "tsne")
        figs.append(("tsne", f"Fig. 5a: t-SNE of {pos.shape[1]} latent positions at every depth 1..{L}"))

        clusters = cluster_depths(pooled, depths, k=k, seed=seed)
        if clusters:
            fig = plot_cluster_grids(feats["images_BHWC"], clusters, n_per_cluster,
                                     title=f"{name}: K-means (k={k}) on {pooling}-pooled {feat_name}")
            save_figure(fig, run_out, "clusters")
            figs.append(("clusters", f"Fig. 6: K-means clusters (k={k}) at depths {', '.join(map(str, sorted(clusters)))}"))
        dropped = [d for d in depths if d not in clusters]
        if dropped:
            notes.append(f"{name}: depths {dropped} exceed L={L} and were left out of the cluster grids")

        labels = feats["labels"]
        if labels:
            nmi = nmi_per_depth(pooled, labels, k=k, seed=seed)
            semantic, lowlevel = _factor_kinds()
            fig = plot_nmi(nmi, lpix, lsem, semantic=semantic, lowlevel=lowlevel, title=f"{name}: NMI per depth (k={k})")
            save_figure(fig, run_out, "nmi")
            figs.append(("nmi", "NMI between K-means clusters and each factor (solid: semantic, dashed: low-level)"))
            if probes:
                from analysis.extract import available_views

                # per-position probes fit on images x positions rows: many minutes on 2 cores at 512 images,
                # so they run only with probes="all"
                chosen = [vp for vp in available_views(feats) if probes == "all" or vp[1] != POSITION]
                res = analyse_views(feats, views=chosen, k=k, seed=seed, nmi={f"{view}/{pooling}": nmi})
                probes_all[name] = {"lpix": lpix, "lsem": lsem, "L": L, "split": split, **res}
                for stem, fig, caption in figures_by_pooling(res, lpix, lsem, semantic, lowlevel, name=name):
                    save_figure(fig, run_out, stem)
                    figs.append((stem, caption))
                extra = crossover_lines(res)
                if res["not_converged"]:
                    notes.append(f"{name}: {res['not_converged']} probe fits stopped at the iteration limit")
        else:
            nmi = {}
            notes.append(f"{name}: the data set has no factor labels, so no NMI and no probes")
        nmi_all[name] = {"lpix": lpix, "lsem": lsem, "L": L, "k": k, "seed": seed, "split": split,
                         "n_images": int(pooled.shape[1]), "nmi": nmi}
        if (view, pooling) != ("z", "mean"):
            nmi_all[name].update(view=view, pooling=pooling)

        metrics = _read_metrics(_run_folder(path))
        per_depth = dict(metrics.get("per_depth") or {})
        from_feats = feature_depth_metrics(feats)
        filled = [m for m in CURVE_METRICS if m not in per_depth and m in from_feats]
        info = {"label": name, "name": name, "lpix": lpix, "lsem": lsem}
        curve_runs.append({**metrics, **info, "per_depth": {**per_depth, **{m: from_feats[m] for m in filled}}})
        # the table prefers metrics.json (per-depth, then its scalars) over numbers from the cached features
        table_fill = [m for m in filled if scalar(metrics, m) is None]
        table_runs.append({**metrics, **info, "per_depth": {**per_depth, **{m: from_feats[m] for m in table_fill}}})
        if filled:
            notes.append(f"{name}: {', '.join(filled)} per depth computed from {feats['pooled_LBd'].shape[1]} cached "
                         f"{split} images ({feats_path.name}), not from metrics.json"
                         + (" (rFID there is a Fréchet distance in the teacher's pooled feature space)" if "rfid" in filled else "")
                         + (f"; in the table: {', '.join(table_fill)}" if table_fill else "; the table uses metrics.json"))
        extractors = metrics.get("extractors") or {}
        said = [f"{m}: {extractors[m]}" for m in CURVE_METRICS if m in per_depth and m in extractors]
        if said:
            notes.append(f"{name}: metrics.json measures " + "; ".join(said))
        sections.append(_section(name, figs, extra))

    save_figure(plot_depth_curves(curve_runs), out, "depth_curves")
    md, csv_text = ablation_table(table_runs)
    (out / "ablation.md").write_text(md)
    (out / "ablation.csv").write_text(csv_text)
    (out / "nmi.json").write_text(json.dumps(nmi_all, indent=2, default=_json_num) + "\n")
    if probes_all:
        (out / "probes.json").write_text(json.dumps(to_json(probes_all), indent=1, allow_nan=False) + "\n")
    header, rows = ablation_rows(table_runs)
    index = out / "index.html"
    index.write_text(_page(sections, table_html(header, rows), notes, split))
    return index


def _factor_kinds() -> tuple[tuple[str, ...], tuple[str, ...]]:
    try:
        from evotok.data.evoshapes import LOWLEVEL_FACTORS, SEMANTIC_FACTORS

        return tuple(SEMANTIC_FACTORS), tuple(LOWLEVEL_FACTORS)
    except ImportError:
        return ("shape", "count"), ("color", "texture", "background")


def _json_num(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    raise TypeError(f"not JSON serialisable: {type(v)}")


def _figure_html(src: str, caption: str) -> str:
    return (f'<figure><a href="{escape(src)}.pdf"><img src="{escape(src)}.png" alt="{escape(caption)}"></a>'
            f"<figcaption>{escape(caption)} (<a href=\"{escape(src)}.pdf\">PDF</a>)</figcaption></figure>")


def _section(name: str, figs: list[tuple[str, str]], crossover: Sequence[str] = ()) -> str:
    body = "\n".join(_figure_html(f"{name}/{stem}", cap) for stem, cap in figs)
    if crossover:
        items = "".join(f"<li>{escape(line)}</li>" for line in crossover)
        body += f"\n<h3>Crossover detector (<a href=\"probes.json\">numbers</a>)</h3><ul>{items}</ul>"
    return f"<section><h2>{escape(name)}</h2>\n{body}\n</section>"


def _page(sections: list[str], table: str, notes: list[str], split: str) -> str:
    note_html = "".join(f"<li>{escape(n)}</li>" for n in notes)
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>EvoTok analysis</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:2em auto}} img{{max-width:100%}}
table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;padding:2px 8px;text-align:right}}
figure{{margin:1em 0}} figcaption{{color:#555;font-size:90%}}</style></head>
<body><h1>EvoTok analysis ({escape(split)} split)</h1>
<h2>Ablation table</h2>
<p>rFID and PSNR at depth L<sub>pix</sub>, CLIPSIM<sub>sem</sub> at depth L<sub>sem</sub>
(<a href="ablation.csv">CSV</a>, <a href="ablation.md">Markdown</a>, <a href="nmi.json">NMI numbers</a>).</p>
{table}
<h2>Per-depth metrics (Fig. 5b)</h2>
{_figure_html("depth_curves", "per-depth rFID, PSNR, CLIPSIM_pix, CLIPSIM_sem; dotted: Lpix, dashed: Lsem")}
{chr(10).join(sections)}
<h2>Notes</h2><ul>{note_html or "<li>none</li>"}</ul>
</body></html>
"""
