"""``bnlab report``: a self-contained HTML page (figures embedded, opens offline) and a Markdown
summary with the figures beside it, from an experiment folder's run store."""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass
from pathlib import Path

from bnlab.experiments.runner import load_probes, load_results
from bnlab.experiments.stats import METRICS, compare, variant_stats
from bnlab.report import plots

TABLE_METRICS = ("final_val_accuracy", "best_val_accuracy", "final_val_loss", "test_accuracy", "epochs_to_target",
                 "steps_to_target", "seconds_to_target", "mean_epoch_seconds")


@dataclass
class Report:
    html: Path
    markdown: Path
    figures: list[Path]


COMPACT_METRICS = ("final_val_accuracy", "final_val_loss", "epochs_to_target", "mean_epoch_seconds")


def stats_rows(runs, variants, target, metrics=TABLE_METRICS):
    labels = {c: label for c, label, _ in METRICS}
    vstats = variant_stats(runs, variants)
    header = ["variant", "runs (failed/diverged)"] + [labels[c] for c in metrics] + (
        [f"reached {target}"] if target else [])
    rows = []
    for v in vstats:
        cells = [v.variant, f"{v.runs} ({v.failed}/{v.diverged})"]
        for c in metrics:
            digits = 4 if ("accuracy" in c or "loss" in c) else 2
            cells.append(v.metrics[c].text(digits))
        if target:
            cells.append(f"{v.reached_target}/{v.runs}")
        rows.append(cells)
    return header, rows


def compare_for(spec, runs):
    """All pairs, or for a grouped study (methods x settings) the methods at equal settings."""
    import itertools
    import json

    variants = list(spec.variants)
    if not any(v.group for v in spec.variants.values()):
        return compare(runs, variants)
    train = {r["variant"]: json.dumps({k: v for k, v in json.loads(r["config"])["train"].items()
                                       if k not in ("seed", "lr")}, sort_keys=True) for r in runs}
    pairs = [(a, b) for a, b in itertools.combinations(variants, 2)
             if spec.variants[a].group != spec.variants[b].group and train.get(a) == train.get(b)]
    return compare(runs, variants, metrics=("final_val_accuracy",), pairs=pairs)


def build_report(folder: str | Path) -> Report:
    folder = Path(folder)
    spec, runs, epochs = load_results(folder)
    variants = list(spec.variants)
    finished = [r for r in runs if r["status"] in ("done", "diverged")]
    figs = {}
    if finished:
        figs["learning_curves"] = plots.to_png(plots.learning_curves(runs, epochs, variants, spec.name))
        figs["final_accuracy"] = plots.to_png(plots.final_accuracy(runs, variants))
        figs["epoch_time"] = plots.to_png(plots.epoch_time(runs, variants))
        if any(v.group for v in spec.variants.values()):
            fig = plots.error_vs_batch_size(runs, spec)
            if fig is not None:
                figs = {"error_vs_batch_size": plots.to_png(fig), **figs}
        probes = load_probes(folder)
        if probes:
            for name, make in (("probe_percentiles", plots.percentile_panels),
                               ("probe_gradient_norms", plots.gradient_norm_panels),
                               ("probe_saturation", plots.saturation_panel),
                               ("probe_landscape", plots.landscape_panels)):
                fig = make(probes, runs, variants)
                if fig is not None:
                    figs[name] = plots.to_png(fig)
    header, rows = stats_rows(runs, variants, spec.target_accuracy)
    comps = compare_for(spec, runs)
    env = next((json.loads(r["environment"]) for r in runs if r.get("environment")), {})
    failures = [(r["run_id"], (r["error"] or "").splitlines()[0]) for r in runs if r["status"] in ("failed", "diverged")]
    counts = {s: sum(r["status"] == s for r in runs) for s in ("done", "diverged", "failed", "pending", "running")}

    fig_dir = folder / "figures"
    fig_dir.mkdir(exist_ok=True)
    paths = []
    for name, png in figs.items():
        (fig_dir / f"{name}.png").write_bytes(png)
        paths.append(fig_dir / f"{name}.png")

    md = [f"# {spec.name}", "", spec.description, "",
          f"Runs: {counts['done']} done, {counts['diverged']} diverged, {counts['failed']} failed, "
          f"{counts['pending'] + counts['running']} not finished.", "",
          "## Statistics (mean ± half-width of the 95% CI over seeds)", "",
          "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    md += ["", "## Comparisons", ""] + [f"- {c.sentence}" for c in comps]
    if failures:
        md += ["", "## Failed or diverged runs", ""] + [f"- {rid}: {err}" for rid, err in failures]
    md += ["", "## Figures", ""] + [f"![{p.stem}](figures/{p.name})" for p in paths]
    md += ["", "## Environment", "", "```json", json.dumps(env, indent=2), "```"]
    md_path = folder / "report.md"
    md_path.write_text("\n".join(md) + "\n")

    html_path = folder / "report.html"
    html_path.write_text(_html(spec, header, rows, comps, figs, env, failures, counts))
    return Report(html_path, md_path, paths)


def _html(spec, header, rows, comps, figs, env, failures, counts) -> str:
    e = html.escape
    table = "<table><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr></thead><tbody>" + "".join(
        "<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows) + "</tbody></table>"
    verdicts = "".join(f"<li class='{'sig' if c.significant else 'nosig'}'>{e(c.sentence)}</li>" for c in comps)
    images = "".join(
        f"<figure><img alt='{e(name)}' src='data:image/png;base64,{base64.b64encode(png).decode()}'>"
        f"<figcaption>{e(name.replace('_', ' '))}</figcaption></figure>" for name, png in figs.items())
    fails = ("<h2>Failed or diverged runs</h2><ul>" + "".join(f"<li><code>{e(r)}</code>: {e(m)}</li>"
                                                               for r, m in failures) + "</ul>") if failures else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>bnlab report: {e(spec.name)}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1150px; margin: 2em auto; padding: 0 1em; color: #222; }}
table {{ border-collapse: collapse; font-size: 0.9em; }} th, td {{ border: 1px solid #ccc; padding: 4px 8px; }}
th {{ background: #f3f3f3; }} td {{ text-align: right; }} td:first-child {{ text-align: left; }}
li.sig {{ font-weight: 600; }} li.nosig {{ color: #555; }} figure {{ margin: 1em 0; }} img {{ max-width: 100%; }}
pre {{ background: #f7f7f7; padding: 1em; overflow-x: auto; font-size: 0.85em; }}
</style></head><body>
<h1>{e(spec.name)}</h1>
<p>{e(spec.description)}</p>
<p>Runs: {counts['done']} done, {counts['diverged']} diverged, {counts['failed']} failed,
{counts['pending'] + counts['running']} not finished.</p>
<h2>Statistics</h2><p>Mean ± half-width of the 95% confidence interval over seeds (t distribution).</p>
{table}
<h2>Comparisons</h2><p>Welch t-tests between variants, Holm-adjusted over the pairs of each metric; a verdict only
where p &lt; 0.05.</p><ul>{verdicts}</ul>
{fails}
<h2>Figures</h2>{images or '<p>No finished runs yet.</p>'}
<h2>Resolved spec</h2><pre>{e(json.dumps(spec.model_dump(mode='json'), indent=2))}</pre>
<h2>Environment</h2><pre>{e(json.dumps(env, indent=2))}</pre>
</body></html>
"""
