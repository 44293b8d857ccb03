"""The report's distribution-shift section (the ``bn-shift`` study, issue 16): which statistics BN should
use at test time, from the runs' shift rows (``bnlab.deploy.shift``, stored in the ``shift`` table).

An *option* is what a variant's model is evaluated with: BN with its moving averages ("running"), with
precise statistics over the clean training data ("precise"), recalibrated on the shifted test inputs
themselves ("recalibrated", AdaBN), or normalising each test batch with its own statistics ("test batch
n"); a model without BN has the running option only (its norms use each sample's own statistics).

Per run and option: the clean accuracy, the accuracy at each severity averaged over the corruptions, and
the accuracy under shift (averaged over every corruption and severity). Over seeds: the mean and its 95%
t interval (``stats.mean_ci``), and the paired difference from the reference option (BN running: the
moving averages of the first variant with BN), seed by seed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from bnlab.experiments.stats import Estimate, mean_ci

STATS_ORDER = {"running": 0, "precise": 1, "recalibrated": 2, "batch": 3}
STATS_LABEL = {"running": "moving averages", "precise": "precise statistics",
               "recalibrated": "recalibrated on the shifted inputs"}
FIGURE = "bn_shift"  # figures/bn_shift.png: the name docs and readers link to


def option_label(variant: str, bn_stats: str, test_batch: int | None, bn: bool = True) -> str:
    if not bn:  # its norms use each image's own statistics: there is nothing to choose
        return f"{variant} (no BN)"
    what = f"test-batch statistics, batch {test_batch}" if bn_stats == "batch" else STATS_LABEL.get(bn_stats, bn_stats)
    return f"{variant}: {what}"


@dataclass
class Option:
    variant: str
    bn_stats: str
    test_batch: int | None
    # run_id -> (seed, {(corruption, severity): accuracy or None}); notes: why rows have no accuracy
    runs: dict[str, tuple[int, dict]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    bn: bool = True  # the variant's model has batch norm (it has options besides 'running')

    @property
    def label(self) -> str:
        return option_label(self.variant, self.bn_stats, self.test_batch, self.bn)

    @property
    def failed(self) -> bool:
        """No run has an accuracy under this option (every row is an error, e.g. a batch of 1)."""
        return all(a is None for _, acc in self.runs.values() for a in acc.values())

    def per_seed(self, severity: int | None) -> dict[int, float]:
        """seed -> accuracy at ``severity`` averaged over its corruptions (0: clean; None: every corrupted
        condition); seeds with a missing accuracy among them are left out."""
        out = {}
        for seed, acc in self.runs.values():
            vals = [a for (c, s), a in acc.items() if (s == severity if severity is not None else s > 0)]
            if vals and all(a is not None for a in vals):
                out[seed] = float(np.mean(vals))
        return out

    def at(self, corruption: str, severity: int) -> dict[int, float]:
        return {seed: acc[(corruption, severity)] for seed, acc in self.runs.values()
                if acc.get((corruption, severity)) is not None}


@dataclass
class ShiftStudy:
    options: list[Option]
    corruptions: list[str]
    severities: list[int]
    reference: Option | None
    test_images: int | None

    def estimate(self, option: Option, severity: int | None) -> Estimate:
        return mean_ci(list(option.per_seed(severity).values()))

    def difference(self, option: Option, severity: int | None = None) -> Estimate | None:
        """The paired difference option - reference over the seeds both have (None for the reference)."""
        if self.reference is None or option is self.reference:
            return None
        a, b = option.per_seed(severity), self.reference.per_seed(severity)
        return mean_ci([a[s] - b[s] for s in sorted(a.keys() & b.keys())])


def study(spec, runs: list[dict], rows: list[dict]) -> ShiftStudy | None:
    """The study from the runs and their shift rows (finished runs only); None without rows."""
    finished = {r["run_id"]: r for r in runs if r["status"] in ("done", "diverged")}
    rows = [r for r in rows if r["run_id"] in finished]
    if not rows:
        return None
    order = {v: i for i, v in enumerate(spec.variants)}
    options: dict[tuple, Option] = {}
    for r in rows:
        run = finished[r["run_id"]]
        key = (run["variant"], r["bn_stats"], r["test_batch"])
        o = options.setdefault(key, Option(*key))
        o.runs.setdefault(r["run_id"], (run["seed"], {}))[1][(r["corruption"], r["severity"])] = r["accuracy"]
        if r["accuracy"] is None and r.get("note") and r["note"] not in o.notes:
            o.notes.append(r["note"])
    ordered = sorted(options.values(), key=lambda o: (order.get(o.variant, len(order)), STATS_ORDER.get(o.bn_stats, 9),
                                                      o.test_batch or 0))
    has_bn = [o.variant for o in ordered if o.bn_stats != "running"]
    for o in ordered:
        o.bn = o.variant in has_bn
    ref_variant = has_bn[0] if has_bn else ordered[0].variant
    reference = next((o for o in ordered if o.variant == ref_variant and o.bn_stats == "running"), None)
    corruptions = list(dict.fromkeys(r["corruption"] for r in rows if r["severity"] > 0))
    severities = sorted({r["severity"] for r in rows if r["severity"] > 0})
    tests = {(json_train(finished[rid]).get("shift") or {}).get("test_images") for rid in {r["run_id"] for r in rows}}
    return ShiftStudy(ordered, corruptions, severities, reference, tests.pop() if len(tests) == 1 else None)


def json_train(run: dict) -> dict:
    import json

    try:
        return json.loads(run["config"])["train"] or {}
    except (TypeError, ValueError, KeyError):
        return {}


# ---------------------------------------------------------------- table and sentence

def header(s: ShiftStudy) -> list[str]:
    ref = s.reference.label if s.reference else "the reference"
    return (["option", "runs", "clean"] + [f"severity {k}" for k in s.severities]
            + ["under shift (all)", f"difference from {ref} under shift (paired, 95% CI)", "note"])


def _cell(e: Estimate, digits: int = 4) -> str:
    return e.value(digits) if e.n else "-"


def table_rows(s: ShiftStudy) -> list[list[str]]:
    rows = []
    for o in s.options:
        n = str(len(o.runs))
        if o.failed:
            error = "error: no prediction"
            rows.append([o.label, n, error] + [error] * len(s.severities) + [error, "-", "; ".join(o.notes)])
            continue
        d = s.difference(o)
        diff = "reference" if o is s.reference else "-" if d is None or d.n == 0 else _diff_text(d)
        rows.append([o.label, n, _cell(s.estimate(o, 0))] + [_cell(s.estimate(o, k)) for k in s.severities]
                    + [_cell(s.estimate(o, None)), diff, "; ".join(o.notes)])
    return rows


def _diff_text(d: Estimate) -> str:
    if d.constant:
        return f"{d.mean:+.4f} (no variation between seeds, n = {d.n})"
    if d.has_interval:
        return f"{d.mean:+.4f} [{d.low:+.4f}, {d.high:+.4f}] (n = {d.n})"
    return f"{d.mean:+.4f} (n = {d.n}: too few seeds for an interval)"


def note(s: ShiftStudy) -> str:
    images = "the whole test set" if s.test_images is None else f"the first {s.test_images} test images"
    return (f"Accuracy of each run's final model on {images}, clean and under {len(s.corruptions)} corruptions "
            f"({', '.join(s.corruptions)}) at severities {', '.join(map(str, s.severities))}; a severity's cell "
            "averages the corruptions per seed first, 'under shift (all)' averages every corruption and severity. "
            "Cells: mean ± half-width of the 95% t interval over seeds (no interval with fewer than 3). The "
            "difference is paired by seed (the same seed's runs of both variants) against the reference, with "
            "its 95% t interval: an interval that excludes 0 is a difference beyond the seed-to-seed noise "
            "(unadjusted for the number of options). Test-batch statistics normalise each test batch (drawn at "
            "random from the test set) with its own statistics; 'error' marks an option that cannot predict at "
            "all, with BN's reason in the note.")


def _inline(d: Estimate) -> str:
    """A paired difference inside a sentence, without parentheses."""
    seeds = f"{d.n} seed{'s' if d.n != 1 else ''}"
    if d.constant:
        return f"{d.mean:+.4f}, the same in all {seeds}"
    if d.has_interval:
        return f"{d.mean:+.4f}, 95% CI [{d.low:+.4f}, {d.high:+.4f}] over {seeds}"
    return f"{d.mean:+.4f} over {seeds}, too few for an interval"


def sentence(s: ShiftStudy, smoke_test: bool = False) -> str:
    """What the table answers, in one plain statement computed from it."""
    if smoke_test:
        return "A smoke test (--quick): the options are listed, no conclusion is drawn."
    scored = [(s.estimate(o, None), o) for o in s.options if not o.failed]
    scored = [(e, o) for e, o in scored if e.n]
    if not scored or s.reference is None:
        return "No option has an accuracy under shift."
    best_e, best = max(scored, key=lambda t: t[0].mean)
    ref, ref_e = s.reference, s.estimate(s.reference, None)
    text = f"Under shift (every corruption and severity), the most accurate option is {best.label}: {best_e.mean:.4f}"
    if best is ref:
        text += ", the reference itself."
    else:
        d = s.difference(best)
        beyond = (" (beyond the seed-to-seed noise)" if d.has_interval and (d.low > 0 or d.high < 0) else
                  " (within the seed-to-seed noise)" if d.has_interval else "")
        text += f" against {ref_e.mean:.4f} for {ref.label}, a paired difference of {_inline(d)}{beyond}."
    close = [(e, o) for e, o in scored if o is not best and best_e.has_interval and e.mean >= best_e.low]
    if close:  # the maximum alone would read as a winner where others are as good
        text += (" Within the 95% interval of its mean: " + "; ".join(f"{o.label} ({e.mean:.4f})" for e, o in
                                                                      sorted(close, key=lambda t: -t[0].mean)) + ".")
    for o in [o for o in s.options if o.bn_stats == "batch" and o.test_batch in (1, 2) and o.variant == ref.variant]:
        if o.failed:
            text += f" At test batch {o.test_batch}, test-batch statistics cannot predict: {o.notes[0] if o.notes else 'no accuracy'}."
            continue
        e, d, clean, ref_clean = s.estimate(o, None), s.difference(o), s.estimate(o, 0), s.estimate(ref, 0)
        text += (f" At test batch {o.test_batch}, test-batch statistics reach {e.mean:.4f} under shift (against the "
                 f"moving averages: {_inline(d)}) and {clean.mean:.4f} on clean images (moving averages: "
                 f"{ref_clean.mean:.4f}).")
    return text


# ---------------------------------------------------------------- figure

def _style(o: Option, batch_index: int, batches: int):
    """The reference variant's options: fixed colours, test batches in one sequential colour map."""
    import matplotlib.pyplot as plt

    from bnlab.report.plots import PALETTE

    if o.bn_stats == "batch":  # small test batches light, large ones dark
        return plt.cm.Purples(0.35 + 0.6 * batch_index / max(1, batches - 1)), "--", "v"
    fixed = {"running": (PALETTE[0], "-", "o"), "precise": (PALETTE[2], "-", "s"),
             "recalibrated": (PALETTE[1], "-", "D")}
    return fixed.get(o.bn_stats, (PALETTE[4], "-", "o"))


def _styles(s: ShiftStudy) -> dict[int, tuple]:
    from bnlab.report.plots import PALETTE

    ref_variant = s.reference.variant if s.reference else None
    batches = sorted({o.test_batch for o in s.options if o.bn_stats == "batch"})
    others = [v for v in dict.fromkeys(o.variant for o in s.options) if v != ref_variant]
    out = {}
    for o in s.options:
        if o.variant == ref_variant:
            out[id(o)] = _style(o, batches.index(o.test_batch) if o.test_batch in batches else 0, len(batches))
        else:  # a reference model without BN (GroupNorm, LayerNorm) or another BN variant: its own colour, dotted
            k = others.index(o.variant)
            base = PALETTE[(3 + k) % len(PALETTE)]
            out[id(o)] = (base, ":" if o.bn_stats == "running" else "-.", "^")
    return out


def figure(s: ShiftStudy):
    """(figure, caption): accuracy against severity averaged over the corruptions (left), and per
    corruption at the highest severity (right); one line per option, mean over seeds, 95% t bands."""
    from bnlab.report.plots import _figure, _legend_below

    shown = [o for o in s.options if not o.failed]
    if not shown:
        return None
    styles = _styles(s)
    fig, axes = _figure(1, 2, figsize=(12, 5.2), gridspec_kw={"width_ratios": [1, 1.25]})
    left, right = axes[0]
    xs = [0] + s.severities
    handles = []
    seeds = set()
    for o in shown:
        color, ls, marker = styles[id(o)]
        est = [s.estimate(o, k) for k in xs]
        seeds |= {seed for seed, _ in o.runs.values()}
        m = np.array([e.mean for e in est])
        (line,) = left.plot(xs, m, ls, color=color, marker=marker, ms=4, lw=1.6, label=o.label)
        lo, hi = np.array([e.low for e in est]), np.array([e.high for e in est])
        if np.isfinite(lo).any():
            left.fill_between(xs, lo, hi, color=color, alpha=0.12, lw=0)
        handles.append(line)
    left.set_xticks(xs, ["clean"] + [str(k) for k in s.severities])
    left.set_xlabel("corruption severity (0 = clean; each point averages the corruptions per seed)")
    left.set_ylabel("test accuracy (fraction correct)")
    left.set_title("accuracy against severity, mean over corruptions", fontsize=10)
    left.grid(alpha=0.3)
    top = max(s.severities)
    width = 0.8 / len(shown)
    for j, o in enumerate(shown):
        color, _, marker = styles[id(o)]
        for i, c in enumerate(s.corruptions):
            e = mean_ci(list(o.at(c, top).values()))
            if not e.n:
                continue
            x = i - 0.4 + width * (j + 0.5)
            err = None if not e.has_interval else [[e.mean - e.low], [e.high - e.mean]]
            right.errorbar([x], [e.mean], yerr=err, fmt=marker, color=color, ms=4, capsize=2, lw=1)
    right.set_xticks(range(len(s.corruptions)), [c.replace("_", " ") for c in s.corruptions])
    right.set_xlabel(f"corruption at severity {top}")
    right.set_ylabel("test accuracy (fraction correct)")
    right.set_title(f"per corruption at severity {top} (mean and 95% CI over seeds)", fontsize=10)
    right.grid(axis="y", alpha=0.3)
    _legend_below(fig, handles, [h.get_label() for h in handles], ncols=3)
    failed = [o.label for o in s.options if o.failed]
    n = len(seeds)
    caption = (f"Which statistics should BN use at test time? Test accuracy of the final models clean and under "
               f"{len(s.corruptions)} corruptions ({', '.join(s.corruptions)}), one line per option (BN with its "
               f"moving averages, precise statistics, recalibrated on the shifted inputs, or each test batch's own "
               f"statistics at each test batch size; models without BN as references). Left: accuracy against "
               f"severity, each seed's accuracy averaged over the corruptions; right: each corruption at severity "
               f"{top}. Lines and points: mean over {n} seed{'s' if n != 1 else ''}; bands and bars: 95% t interval "
               f"over seeds (none with fewer than 3).")
    if failed:
        caption += f" Not drawn, because they cannot predict: {', '.join(failed)} (see the table)."
    return fig, caption


# ---------------------------------------------------------------- the section

@dataclass
class Section:
    header: list[str]
    rows: list[list[str]]
    note: str
    sentence: str


def section(spec, runs: list[dict], rows: list[dict],
            no_conclusions: str | None = None) -> tuple[Section | None, tuple | None]:
    """(the table and sentence, the (figure, caption)), each None without shift rows. ``no_conclusions``
    (``bnlab.report.build.report_mode``'s reason: a smoke test): the accuracies only, without the paired
    differences and their intervals, and the reason in place of the sentence."""
    s = study(spec, runs, rows)
    if s is None:
        return None, None
    if no_conclusions:
        cut = header(s).index(next(h for h in header(s) if h.startswith("difference from")))
        drop = lambda row: row[:cut] + row[cut + 1:]  # noqa: E731
        return Section(drop(header(s)), [drop(r) for r in table_rows(s)],
                       note(s).split(" The difference is paired")[0] + " No difference is tested: "
                       + no_conclusions + ".", f"No conclusion is drawn ({no_conclusions})."), figure(s)
    return Section(header(s), table_rows(s), note(s), sentence(s, spec.smoke_test)), figure(s)


TITLE = "BN under distribution shift"


def markdown(sec: Section, md_table) -> list[str]:
    return ["", f"## {TITLE}", "", sec.note, ""] + md_table(sec.header, sec.rows) + ["", f"**{sec.sentence}**"]


def html(sec: Section, html_table) -> str:
    import html as h

    return (f"<h2>{TITLE}</h2><p>{h.escape(sec.note)}</p>" + html_table(sec.header, sec.rows)
            + f"<p><strong>{h.escape(sec.sentence)}</strong></p>")


__all__ = ["FIGURE", "Option", "Section", "ShiftStudy", "figure", "markdown", "html", "option_label", "section",
           "sentence", "study", "table_rows"]

