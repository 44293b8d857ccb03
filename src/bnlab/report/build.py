"""``bnlab report``: a self-contained HTML page (figures embedded, opens offline) and a Markdown
summary with the figures beside it, from an experiment folder's run store."""

from __future__ import annotations

import base64
import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from bnlab.experiments.read import DAMAGED, load_probes, load_results, load_shift
from bnlab.experiments.store import is_number, parse_config
from bnlab.experiments.results import COMPACT_FIELDS, FIELDS, TABLE_FIELDS
from bnlab.experiments.stats import ALPHA, MIN_N, Comparison, compare, precise_vs_moving, variant_stats
from bnlab.report import plots
from bnlab.report import shift as shift_report

TABLE_METRICS = TABLE_FIELDS  # the report's statistics table: the result fields marked table=True
COMPACT_METRICS = COMPACT_FIELDS  # the terminal's (bnlab run / compare)


@dataclass
class Report:
    html: Path
    markdown: Path
    figures: list[Path]
    smoke_test: bool = False  # a --quick run's report: titled as a smoke test, no verdicts
    damaged: list[tuple[str, str]] = field(default_factory=list)  # (run_id, why) of damaged stored runs


def stats_rows(runs, variants, target, metrics=TABLE_METRICS, short: bool = False):
    """(header, rows) of the statistics table: per variant, every planned run and what became of it,
    then one cell per result field (columns no run has a value for are left out); ``short``: the
    fields' short headers, for the terminal."""
    vstats = variant_stats(runs, variants, target)
    cols = [m for m in metrics if (FIELDS[m].kind == "time_to_target" and target is not None)
            or (FIELDS[m].kind != "time_to_target" and any(r.get(m) is not None for r in runs))]
    header = ["variant", "runs"] + [
        FIELDS[c].header if short else FIELDS[c].label + (" (KM median [95% CI])"
                                                          if FIELDS[c].kind == "time_to_target" else "")
        for c in cols]
    header += [f"reached {target}"] if target is not None else []
    rows = []
    for v in vstats:
        cells = [v.variant, v.runs_text()]
        for c in cols:
            f = FIELDS[c]
            if f.kind == "time_to_target":
                cells.append(v.times[c].text(f.digits))
                continue
            e = v.metrics[c]
            if e.n == 0 and v.done and e.missing.get("without a value") == v.done:
                cells.append("n/a")  # not recorded for this variant (precise statistics without BN)
            else:
                cells.append(e.text(f.digits))
        if target is not None:
            cells.append(f"{v.reached_target}/{v.done + v.diverged}")
        rows.append(cells)
    return header, rows


def compare_for(spec, runs, metrics=None):
    """All pairs, or for a grouped study (methods x settings) the methods at equal settings (then
    the primary metric only). Equal settings: the same training settings but the seed and the learning
    rate, with the data-parallel processes replaced by the images per device (``device_batch``), so that
    Ghost BN in one process meets per-device BN on the devices it emulates."""
    from bnlab.experiments.stats import device_batch

    import itertools

    variants = list(spec.variants)
    kw = dict(primary=spec.primary_metric, target=spec.target_accuracy, smoke_test=spec.smoke_test)
    if not any(v.group for v in spec.variants.values()):
        return compare(runs, variants, metrics=metrics, **kw)
    def setting(config: dict) -> str:
        kept = {k: v for k, v in config["train"].items() if k not in ("seed", "lr", "devices")}
        return json.dumps({**kept, "images_per_device": device_batch(config)}, sort_keys=True)

    train = {r["variant"]: setting(_config(r)) for r in runs}
    pairs = [(a, b) for a, b in itertools.combinations(variants, 2)
             if spec.variants[a].group != spec.variants[b].group and train.get(a) == train.get(b)]
    return compare(runs, variants, metrics=(), pairs=pairs, **kw)


def _config(r: dict) -> dict:
    """A run's config through the store's one rule (``store.parse_config``): a damaged one reads as empty."""
    config = parse_config(r.get("config"))[0] or {}
    return {"model": config.get("model", {}), "train": config.get("train", {})}


def _seq(values) -> str:
    values = sorted(v for v in values if is_number(v))
    if not values:
        return "none"
    return str(values[0]) if len(values) == 1 else f"{values[0]} to {values[-1]}"


def budget_text(spec, runs) -> str:
    """The budget really run: variants, seeds, epochs and optimizer steps per run (from the runs)."""
    seeds = sorted({r["seed"] for r in runs if is_number(r["seed"])}) or spec.seed_list()
    train = [_config(r)["train"] for r in runs]
    epochs = {t.get("epochs") for t in train if t.get("epochs") is not None}
    batches = {t.get("batch_size") for t in train if t.get("batch_size") is not None}
    steps = {r["steps_run"] for r in runs if r["status"] in ("done", "diverged") and r.get("steps_run") is not None}
    caps = {t.get("max_steps") for t in train if t.get("max_steps")}
    text = (f"{len(spec.variants)} variant{'s' if len(spec.variants) != 1 else ''} × {len(seeds)} "
            f"seed{'s' if len(seeds) != 1 else ''} ({', '.join(map(str, seeds))}) = {len(runs)} runs")
    ran = {r["epochs_run"] for r in runs if r["status"] in ("done", "diverged") and r.get("epochs_run") is not None}
    if epochs and ran and max(ran) < min(epochs):  # a step budget ended the runs: the epochs they had
        text += f", {_seq(ran)} epoch{'s' if max(ran) != 1 else ''} each (of {_seq(epochs)} planned)"
    elif epochs:
        text += f", {_seq(epochs)} epoch{'s' if max(epochs) != 1 else ''} each"
    if steps:
        text += f", {_seq(steps)} optimizer steps per run"
    elif caps:
        text += f", at most {_seq(caps)} optimizer steps per run"
    if batches:
        text += f" (batch {_seq(batches)})"
    precisions = sorted({t.get("precision", "fp32") for t in train})  # absent: a run from before precisions
    if precisions:
        text += f"; precision {' and '.join(precisions)}"
    devices = sorted({t.get("devices", 1) for t in train})  # absent: one process
    if devices != [1]:
        text += f"; data-parallel over {_seq(set(devices))} process{'es' if max(devices) > 1 else ''}"
    return text


def report_mode(spec, runs=()) -> str | None:
    """THE rule for "this report draws no conclusions": the reason in words, or None for a report that draws
    them. A smoke test (``spec.smoke_test``, set by --quick) checks that the pipeline runs: its report, its
    Markdown and the terminal's table (``bnlab run`` / ``bnlab compare``) show each run's numbers but no
    p-value, no verdict, no trend or interaction and no reading of one, only this reason."""
    if not spec.smoke_test:
        return None
    seeds = len({r["seed"] for r in runs if is_number(r["seed"])}) or len(spec.seed_list())
    train = [_config(r) for r in runs]
    epochs = {t.get("train", {}).get("epochs") for t in train} - {None} or {
        v.train.get("epochs", spec.train.get("epochs")) for v in spec.variants.values()} - {None}
    budget = f"{seeds} seed{'s' if seeds != 1 else ''}" + (
        f", {_seq(epochs)} epoch{'s' if max(epochs) != 1 else ''}" if epochs else "")
    return f"smoke test: {budget}: the pipeline ran; no conclusions"


def report_title(spec) -> str:
    return f"Smoke test (--quick): {spec.name}" if spec.smoke_test else spec.name


def limits_text(spec) -> str:
    """What the data options ``train_limit`` / ``test_limit`` cut (a description names the full sizes)."""
    options = spec.data.options or {}
    cuts = [f"the first {options[k]:,} {what}" for k, what in (
        ("train_limit", "training examples (before the validation split)"), ("test_limit", "test examples"))
        if options.get(k) is not None]
    return f"Data cut to {' and '.join(cuts)} (data options train_limit / test_limit)." if cuts else ""


def intro(spec, runs) -> list[str]:
    """The paragraphs under the title: the description, or for a smoke test what was really run; and what the
    data options cut."""
    if (why := report_mode(spec, runs)) is not None:
        return [p for p in (f"A smoke test, not an experiment: {budget_text(spec, runs)}. It checks that every "
                            f"variant runs end to end; its numbers are not results ({why}). Run "
                            f"`bnlab run` without --quick for the experiment itself.", limits_text(spec)) if p]
    return [p for p in (spec.description, f"Budget run: {budget_text(spec, runs)}.", limits_text(spec)) if p]


STATS_NOTE = (f"Outcomes: mean ± half-width of the 95% confidence interval over seeds (t distribution; no interval "
              f"with fewer than {MIN_N} runs), over the runs that finished without diverging; '(n=k; ...)' marks a "
              "cell with fewer than the planned runs and says what became of the others. Times to target: "
              "Kaplan-Meier median [95% CI]; a run that never reached the target is censored at its budget, not "
              "dropped; a diverged run never reaches it and is censored at the end of its planned budget (the cell "
              "says how many diverged, and where). The median's interval is the log-log (exponential "
              "Greenwood) one, as R's survfit(conf.type = 'log-log'); ∞ means its upper end is undefined: the "
              "band does not cross 0.5 before the last observed time, as is common with 5 runs.")

PRECISE_NOTE = ("Accuracy of the final model with BN's moving averages and with precise population statistics "
                "(bnlab.deploy.recalibrate, mode 'inference': every BN layer's mean and variance over all the values it "
                "sees across the training data, with the layers before it already on their new statistics, i.e. "
                "the statistics of the network as deployed), and their difference paired over the runs. A CI that contains 0 means no "
                "difference was detected at this resolution, not that the two are equal.")


def comparisons_note(spec, comps, runs=()) -> str:
    if (why := report_mode(spec, runs)) is not None:
        return f"No test, trend, interaction or reading: a smoke test (--quick) draws no conclusions ({why})."
    label = FIELDS[spec.primary_metric].label
    m = sum(c.p is not None for c in comps if c.role == "primary")
    return (f"Primary metric: {label}. Verdicts are drawn on it alone: Holm-adjusted p < {ALPHA} over its {m} tested "
            f"pair{'s' if m != 1 else ''} of variants, from a paired t-test where both variants ran the same seeds "
            f"(Welch's t-test otherwise), with an exact permutation test alongside that must agree (Holm-adjusted "
            f"p < {ALPHA} too); times to target by the exact log-rank test (every relabelling of the runs), the "
            "asymptotic one shown beside it. A verdict needs a test that can reach α: where the exact test's smallest "
            "attainable p after Holm is not below it (2/2^n paired: 3 seeds 0.25, 5 seeds 0.0625; 2/C(2n, n) "
            "otherwise: 3 vs 3 0.1) there is no verdict, and the sentence says how many seeds would make one "
            f"possible. A test needs every planned run, at least {MIN_N} per variant, and variation between seeds "
            "(for times to target, a complete separation such as 5/5 vs 0/5 reaching the target is tested); a "
            "variant with diverged runs wins nothing. Each tested outcome states the smallest difference the design "
            "detects with 80% power from the observed SD (statsmodels TTestPower / TTestIndPower). Every other "
            "metric is exploratory: differences, intervals and unadjusted p-values, no verdicts.")


EXPLORATORY_HEADER = ["metric", "variants", "values", "difference a - b (95% CI)", "test", "p (unadjusted)",
                      "detectable at 80% power", "note"]


def exploratory_rows(comps: list[Comparison]) -> list[list[str]]:
    rows = []
    for c in comps:
        if c.role != "exploratory":
            continue
        p = "-" if c.p is None else (f"{c.p:.2g}" + (f"; {c.exact_test} {c.p_exact:.2g}" if c.p_exact is not None
                                                    else ""))
        note = "; ".join(t for t in (c.extra, c.reason) if t)
        mde = f"±{c.mde:.{FIELDS[c.metric].digits}f}" if c.metric in FIELDS and math.isfinite(c.mde) else "-"
        rows.append([c.label, f"{c.a} vs {c.b}", f"{c.value_a} vs {c.value_b}", c.diff_text, c.test or "none", p,
                     mde, note])
    return rows


TREND_HEADER = ["method", "error of", "runs", "images per device", "slope: error change per doubling (95% CI)", "p"]
TREND_NOTE = ("Each method's error (%) regressed on log2(images per device) by least squares over all its finished "
              "runs (seeds as replicates, every per-device batch at once): the slope is the change of the error when "
              "the per-device batch doubles (negative: larger per-device batches help), with its 95% t interval and "
              "the p-value of a flat line. One test per method and error, unadjusted; a method with runs not "
              "finished or failed gets no fit, and diverged runs (no accuracy) are left out and counted. At a fixed "
              "number of epochs a larger batch also means fewer optimizer steps: a slope mixes BN's batch "
              "statistics with the training budget, which is why methods are compared at equal settings.")


def trend_rows(spec, runs) -> list[list[str]]:
    """One row per method (variant group) and error panel of the batch-size figure (grouped studies only)."""
    from bnlab.experiments.stats import trend

    if not any(v.group for v in spec.variants.values()):
        return []
    group_of = {r["run_id"]: spec.variants[r["variant"]].group or r["variant"] for r in runs}
    status = {g: [r["status"] for r in runs if group_of[r["run_id"]] == g] for g in set(group_of.values())}
    rows = []
    for metric in plots.error_panels(runs):
        for group, by in plots.by_device_batch(runs, spec, metric).items():
            label = FIELDS[metric].label.replace("accuracy", "error")
            settings = ", ".join(map(str, sorted(by)))
            finished = sum(s in plots.FINISHED for s in status[group])
            if finished < len(status[group]):
                rows.append([group, label, str(sum(map(len, by.values()))), settings,
                             f"no fit: incomplete ({finished} of {len(status[group])} runs finished)", "-"])
                continue
            xs = [x for x, vals in by.items() for _ in vals]
            t = trend(group, metric, xs, [a for vals in by.values() for a in vals])
            diverged = status[group].count("diverged")
            rows.append([group, label, str(t.n) + (f" ({diverged} diverged, left out)" if diverged else ""), settings,
                         t.slope_text, t.p_text])
    return rows


INTERACTION_HEADER = ["method", "against", "error of", "runs", "interaction: slope difference per doubling (95% CI)",
                      "p", "reading"]
INTERACTION_NOTE = ("Does a method suffer more from small batches than the reference? One regression per method over "
                    "the finished runs of both: error (%) on log2(images per device), the method, their interaction "
                    "and one offset per seed (a seed's runs share data order and initial weights), by ordinary least "
                    "squares (statsmodels). The interaction is how much steeper the method's line is than the "
                    "reference's (negative: its error falls faster as the batch grows, i.e. small batches hurt it "
                    "more), with its 95% t interval and the p-value of equal slopes; unadjusted, one per method. A "
                    "method whose batch axis is not the reference's (a Ghost-BN arm varies only the statistics batch "
                    "at a fixed optimiser batch) reads against its own trend above rather than this test.")


def batch_axis(spec, runs, group: str) -> str:
    """What a method's (variant group's) runs vary along the images-per-device axis: "the optimiser batch"
    (its per-device batch changes), or "the statistics batch" (one optimiser batch, the batch BN normalises
    over changing: a Ghost-BN arm). Methods on different axes are not comparable by one regression."""
    from bnlab.experiments.stats import device_batch

    configs = [c for r in runs if (spec.variants[r["variant"]].group or r["variant"]) == group
               and (c := parse_config(r.get("config"))[0]) is not None]
    per_device = {-(-c.get("train", {}).get("batch_size", 32) // c.get("train", {}).get("devices", 1))
                  for c in configs}
    statistics = {device_batch(c) for c in configs}
    return "the statistics batch" if len(per_device) == 1 and len(statistics) > 1 else "the optimiser batch"


def interaction_rows(spec, runs) -> list[list[str]]:
    """One row per method and error panel: its interaction with log2(images per device) against
    ``spec.reference_group`` (complete methods whose batch axis is the reference's, ``batch_axis``)."""
    from bnlab.experiments.stats import device_batch, interaction

    ref = spec.reference_group
    if not ref:
        return []
    group_of = {name: v.group or name for name, v in spec.variants.items()}
    unfinished = {group_of[r["variant"]] for r in runs if r["status"] not in plots.FINISHED}
    axis = {g: batch_axis(spec, runs, g) for g in plots.method_order(spec)}
    rows = []
    for metric in plots.error_panels(runs):
        label = FIELDS[metric].label.replace("accuracy", "error")
        points = [(group_of[r["variant"]], device_batch(_config(r)), r["seed"], plots.accuracy_of(r, metric))
                  for r in runs if r["status"] == "done"]
        for group in plots.method_order(spec):
            if group == ref:
                continue
            if {group, ref} & unfinished:
                rows.append([group, ref, label, "-", "no fit: runs not finished", "-", "-"])
                continue
            if axis[group] != axis[ref]:  # incomparable: read against its own trend, never this test
                rows.append([group, ref, label, "-", f"not tested: it varies {axis[group]}, {ref} {axis[ref]} "
                             "(see its own trend above)", "-", "-"])
                continue
            it = interaction(group, ref, metric, points)
            rows.append([group, ref, label, str(it.n), it.d_text, it.p_text, it.reading])
    return rows


PRECISE_HEADER = ["variant", "accuracy", "moving averages", "precise statistics", "difference (precise - moving)",
                  "difference detected?"]


def precise_rows(notes) -> list[list[str]]:
    rows = []
    for n in notes:
        d = n.diff
        diff = f"{d.mean:+.4f}" + (f" ± {(d.high - d.low) / 2:.4f}" if d.has_interval else
                                    " (no variation between seeds)" if d.constant else "")
        verdict = ("yes: they disagree beyond the 95% CI" if n.disagree
                   else f"n = {d.n}: too few runs to tell" if d.n < MIN_N else "no: the 95% CI of the difference contains 0")
        rows.append([n.variant, FIELDS[n.moving].label, n.moving_value.value(4), n.precise_value.value(4), diff,
                     verdict])
    return rows


FAILURES_TITLE = "Runs without a regular result, and damaged runs"


def failure_lines(runs) -> list[tuple[str, str]]:
    """(run_id, what happened) for every planned run that has no regular result, and every damaged run
    (``bnlab.experiments.store.damage``: ``bnlab run`` redoes it)."""
    out = []
    for r in runs:
        if r["status"] == DAMAGED:
            out.append((r["run_id"], f"damaged: {r.get('damage')}; left out of the statistics; 'bnlab run' "
                                     "redoes it"))
        elif r.get("damage"):
            out.append((r["run_id"], f"damaged: {r['damage']}; its stored results ({r['status']}) are counted; "
                                     "'bnlab run' redoes it"))
        elif r["status"] in ("failed", "diverged"):
            out.append((r["run_id"], f"{r['status']}: {(r.get('error') or 'no message').splitlines()[0]}"))
        elif r["status"] in ("pending", "running"):
            out.append((r["run_id"], f"not finished ({r['status']})"))
    return out


def _json(text):
    """A stored JSON text, or None where it is not JSON (a damaged row is reported, never raised on)."""
    try:
        return json.loads(text)
    except (TypeError, ValueError, RecursionError):
        return None


def build_report(folder: str | Path) -> Report:
    folder = Path(folder)
    spec, runs, epochs = load_results(folder)
    variants = list(spec.variants)
    finished = [r for r in runs if r["status"] in ("done", "diverged")]
    figs = {}  # name -> (png, caption): every figure the report shows has a caption sentence
    if finished:
        figs["learning_curves"] = _png(plots.learning_curves(runs, epochs, variants, spec.name))
        figs["final_accuracy"] = _png(plots.final_accuracy(runs, variants))
        figs["epoch_time"] = _png(plots.epoch_time(runs, variants))
        if any(v.group for v in spec.variants.values()):
            made = plots.error_vs_batch_size(runs, spec, fits=report_mode(spec, runs) is None)
            if made is not None:
                figs = {"error_vs_batch_size": _png(made), **figs}
            made = plots.curves_by_method(runs, epochs, spec)
            if made is not None:
                figs["curves_by_method"] = _png(made)
        probes = load_probes(folder)
        if probes:
            for name, make in (("probe_test_accuracy", plots.test_accuracy_panel),
                               ("probe_percentiles", plots.percentile_panels),
                               ("probe_gradient_norms", plots.gradient_norm_panels),
                               ("probe_saturation", plots.saturation_panel),
                               ("probe_landscape", plots.landscape_panels)):
                made = make(probes, runs, variants)
                if made is not None:
                    figs[name] = _png(made)
    # the bn-shift study: its figure first
    shift, made = shift_report.section(spec, runs, load_shift(folder), report_mode(spec, runs))
    if made is not None:
        figs = {shift_report.FIGURE: _png(made), **figs}
    t = texts(spec, runs)
    _figure1_texts(t, folder, spec, runs, probes if finished else [])
    env = next((e for r in runs if r.get("environment") and isinstance(e := _json(r["environment"]), dict)), {})

    fig_dir = folder / "figures"
    fig_dir.mkdir(exist_ok=True)
    paths = []
    for name, (png, _) in figs.items():
        (fig_dir / f"{name}.png").write_bytes(png)
        paths.append(fig_dir / f"{name}.png")

    md = _markdown(t, shift_report.markdown(shift, _md_table) if shift else [])
    md += ["", "## Figures", ""] + [line for p in paths for line in (
        f"![{p.stem.replace('_', ' ')}](figures/{p.name})", "", f"*{figs[p.stem][1]}*", "")]
    md += ["", "## Environment", "", "```json", json.dumps(env, indent=2), "```"]
    md_path = folder / "report.md"
    md_path.write_text("\n".join(md) + "\n")

    html_path = folder / "report.html"
    html_path.write_text(_html(spec, t, figs, env, shift_report.html(shift, _html_table) if shift else ""))
    return Report(html_path, md_path, paths, spec.smoke_test,
                  [(rid, why) for rid, why in failure_lines(runs) if why.startswith("damaged: ")])


@dataclass
class Texts:
    """What the report says in words and tables (the figures aside), shared by Markdown, HTML and the terminal."""
    title: str
    intro: list[str]
    budget: str
    runs_line: str
    header: list[str]
    rows: list[list[str]]
    precise: list[list[str]]  # rows under PRECISE_HEADER
    precise_sentences: list[str]  # where precise statistics and moving averages disagree
    comparisons_note: str
    primary: list[Comparison]
    exploratory: list[list[str]]  # rows under EXPLORATORY_HEADER
    failures: list[tuple[str, str]]
    exploratory_comparisons: list[Comparison]
    trends: list[list[str]]  # rows under TREND_HEADER
    interactions: list[list[str]] = field(default_factory=list)  # rows under INTERACTION_HEADER
    drift: tuple[str, list[str], list[list[str]]] | None = None  # (note, header, rows): figure1.drift_table
    no_conclusions: str | None = None  # report_mode: why this report draws none (then no test, fit or reading)
    data: list[str] = field(default_factory=list)  # figure1.data_sentences: the data trained on, where it differs


def texts(spec, runs, metrics=TABLE_METRICS, compared=None, short: bool = False) -> Texts:
    variants = list(spec.variants)
    header, rows = stats_rows(runs, variants, spec.target_accuracy, metrics, short)
    comps = compare_for(spec, runs, compared)
    notes = precise_vs_moving(runs, variants)
    counts = {s: sum(r["status"] == s for r in runs)
              for s in ("done", "diverged", "failed", "pending", "running", DAMAGED)}
    runs_line = (f"Runs: {len(runs)} planned: {counts['done']} done, {counts['diverged']} diverged, "
                 f"{counts['failed']} failed, {counts['pending'] + counts['running']} not finished"
                 + (f", {counts[DAMAGED]} damaged (left out)" if counts[DAMAGED] else "")
                 + (f"; {lost} lost their run folder or a checkpoint (counted)"
                    if (lost := sum(bool(r.get("damage")) and r["status"] != DAMAGED for r in runs)) else "")
                 + ".")
    precise = precise_rows(notes)
    why = report_mode(spec, runs)
    if why is not None:  # numbers only: judged, tested, fitted and read nowhere
        precise = [r[:-1] + ["not judged (smoke test)"] for r in precise]
        comps = [c for c in comps if c.role not in ("primary", "exploratory")]
    return Texts(report_title(spec), intro(spec, runs), budget_text(spec, runs), runs_line, header, rows, precise,
                 [] if why else [n.sentence for n in notes if n.disagree], comparisons_note(spec, comps, runs),
                 [c for c in comps if c.role == "primary"], exploratory_rows(comps), failure_lines(runs),
                 [c for c in comps if c.role == "exploratory"], [] if why else trend_rows(spec, runs),
                 [] if why else interaction_rows(spec, runs), no_conclusions=why)


def _md_table(header, rows) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]


def _markdown(t: Texts, shift: list[str] = ()) -> list[str]:
    md = [f"# {t.title}", ""]
    for p in t.intro:
        md += [p, ""]
    md += [t.runs_line, "", "## Statistics", "", STATS_NOTE, ""] + _md_table(t.header, t.rows)
    if t.precise:
        md += ["", "## BN statistics at test time", "", PRECISE_NOTE, ""]
        md += _md_table(PRECISE_HEADER, t.precise)
        md += [""] + [f"**{s}**" for s in t.precise_sentences]
    md += list(shift)
    if t.trends:
        md += ["", "## Trend with the images per device", "", TREND_NOTE, ""] + _md_table(TREND_HEADER, t.trends)
    if t.interactions:
        md += ["", "### Against the reference method", "", INTERACTION_NOTE, ""]
        md += _md_table(INTERACTION_HEADER, t.interactions)
    if t.drift:
        md += ["", "## Drift of the last hidden layer's input", "", t.drift[0], ""] + _md_table(*t.drift[1:])
    md += ["", "## Comparisons", "", t.comparisons_note, ""] + [f"- {c.sentence}" for c in t.primary]
    if t.exploratory:
        md += ["", "### Exploratory comparisons (no verdicts)", ""] + _md_table(EXPLORATORY_HEADER, t.exploratory)
    if t.failures:
        md += ["", f"## {FAILURES_TITLE}", ""] + [f"- {rid}: {what}" for rid, what in t.failures]
    return md


def _figure1_texts(t: Texts, folder: Path, spec, runs, probes) -> None:
    """The data sentence of an experiment with a [data] fallback, and the drift table of the last hidden
    layer's input (``bnlab.report.figure1``)."""
    from bnlab.report import figure1

    t.data = figure1.data_sentences(folder, spec)
    t.intro.extend(t.data)
    layer, _ = plots.last_hidden_activation(probes)
    header, rows = figure1.drift_table(probes, runs, list(spec.variants), layer, spec.smoke_test)
    if rows:
        t.drift = (figure1.drift_note(layer), header, rows)


def _png(made) -> tuple[bytes, str]:
    """(figure, caption) from ``bnlab.report.plots`` -> (PNG bytes, caption)."""
    fig, caption = made
    return plots.to_png(fig), caption


def _html_table(header, rows) -> str:
    e = html.escape
    return "<table><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr></thead><tbody>" + "".join(
        "<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows) + "</tbody></table>"


def _html(spec, t: Texts, figs, env, shift: str = "") -> str:
    e = html.escape
    table = _html_table(t.header, t.rows)
    verdicts = "".join(f"<li class='{'sig' if c.significant else 'nosig'}'>{e(c.sentence)}</li>" for c in t.primary)
    precise = (f"<h2>BN statistics at test time</h2><p>{e(PRECISE_NOTE)}</p>" + _html_table(PRECISE_HEADER, t.precise) + "".join(f"<p><strong>{e(s)}</strong></p>"
                                                                         for s in t.precise_sentences)
               ) if t.precise else ""
    trends = (f"<h2>Trend with the images per device</h2><p>{e(TREND_NOTE)}</p>" + _html_table(TREND_HEADER, t.trends)
              ) if t.trends else ""
    if t.interactions:
        trends += (f"<h3>Against the reference method</h3><p>{e(INTERACTION_NOTE)}</p>"
                   + _html_table(INTERACTION_HEADER, t.interactions))
    exploratory = ("<h3>Exploratory comparisons (no verdicts)</h3>" + _html_table(EXPLORATORY_HEADER, t.exploratory)
                   ) if t.exploratory else ""
    intro = "".join(f"<p>{e(p)}</p>" for p in t.intro)
    drift = (f"<h2>Drift of the last hidden layer's input</h2><p>{e(t.drift[0])}</p>" + _html_table(*t.drift[1:])
             ) if t.drift else ""
    images = "".join(
        f"<figure><img alt='{e(name.replace('_', ' '))}' src='data:image/png;base64,{base64.b64encode(png).decode()}'>"
        f"<figcaption>{e(caption)}</figcaption></figure>" for name, (png, caption) in figs.items())
    fails = (f"<h2>{e(FAILURES_TITLE)}</h2><ul>" + "".join(f"<li><code>{e(r)}</code>: {e(m)}</li>"
                                                           for r, m in t.failures) + "</ul>"
             ) if t.failures else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>bnlab report: {e(t.title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1150px; margin: 2em auto; padding: 0 1em; color: #222; }}
table {{ border-collapse: collapse; font-size: 0.9em; }} th, td {{ border: 1px solid #ccc; padding: 4px 8px; }}
th {{ background: #f3f3f3; }} td {{ text-align: right; }} td:first-child {{ text-align: left; }}
li.sig {{ font-weight: 600; }} li.nosig {{ color: #555; }} figure {{ margin: 1em 0; }} img {{ max-width: 100%; }}
pre {{ background: #f7f7f7; padding: 1em; overflow-x: auto; font-size: 0.85em; }}
</style></head><body>
<h1>{e(t.title)}</h1>
{intro}
<p>{e(t.runs_line)}</p>
<h2>Statistics</h2><p>{e(STATS_NOTE)}</p>
{table}
{precise}
{shift}
{trends}
{drift}
<h2>Comparisons</h2><p>{e(t.comparisons_note)}</p><ul>{verdicts}</ul>
{exploratory}
{fails}
<h2>Figures</h2>{images or '<p>No finished runs yet.</p>'}
<h2>Resolved spec</h2><pre>{e(json.dumps(spec.model_dump(mode='json'), indent=2))}</pre>
<h2>Environment</h2><pre>{e(json.dumps(env, indent=2))}</pre>
</body></html>
"""
