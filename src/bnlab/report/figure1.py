"""What a report says about Ioffe & Szegedy's Figure 1 and the data an experiment ran on: the data sentence
of the intro (an experiment with a ``[data] fallback``) and the drift table of the last hidden layer's input."""

from __future__ import annotations

from pathlib import Path

from bnlab.experiments.drift import FRACTION, drift_rows
from bnlab.experiments.read import STORE
from bnlab.experiments.spec import DataChoice
from bnlab.experiments.store import RunStore


def data_choice(folder: str | Path) -> DataChoice | None:
    """The data choice stored with the experiment (None: its spec has no [data] fallback)."""
    store = RunStore(Path(folder) / STORE, readonly=True)
    try:
        text = store.get_meta("data_choice")
    finally:
        store.close()
    return None if text is None else DataChoice.from_json(text)


def data_sentence(choice: DataChoice) -> str:
    from bnlab.data import dataset_info

    if not choice.fallback:
        return f"Data: {choice.dataset}, the spec's dataset ({dataset_info(choice.dataset).description})."
    return (f"Data: {choice.dataset}, the spec's fallback for {choice.primary} ({choice.reason}): the embedded real "
            f"digits, split as the spec's fallback says, tested on the 10,000 real MNIST test digits"
            if choice.dataset == "mnist-5k" else
            f"Data: {choice.dataset}, the spec's fallback for {choice.primary} ({choice.reason})") + "."


def declared_dataset(spec) -> str | None:
    """The dataset of the experiment's own [data] section where a --quick run's [quick] data swapped another
    in (the stored spec is the quick one): known for a shipped preset whose quick scale the stored spec is;
    None where nothing was swapped or the declared one is not known (a spec file's own [data])."""
    from bnlab.experiments.spec import apply_quick, load_experiment, preset_names

    if not spec.smoke_test or "dataset" not in spec.quick.data or spec.name not in preset_names():
        return None
    preset = load_experiment(spec.name)
    quick = apply_quick(preset)
    if quick.quick != spec.quick or quick.data.dataset != spec.data.dataset:
        return None  # a spec file that takes a preset's name
    return preset.data.dataset


def trained_on(spec, choice: DataChoice | None) -> str | None:
    """The one sentence, naming both, where the dataset the runs trained on is not the one the preset or spec
    declares: a [data] fallback taken, or a --quick scale that swaps in another dataset; None where they agree.
    The report's intro and the terminal (bnlab run, bnlab compare) both say it."""
    quick = spec.quick.data.get("dataset") if spec.smoke_test else None
    if quick is None:
        return data_sentence(choice) if choice is not None and choice.fallback else None
    actual = choice.dataset if choice is not None else spec.data.dataset
    declared = declared_dataset(spec)
    if declared == actual:
        return None
    text = (f"Trained on {actual}, not {declared}, the preset's dataset: the smoke test (--quick) swaps in {quick}"
            if declared is not None else
            f"Trained on {actual}: the smoke test (--quick) swaps in {quick}, the dataset its [quick] section names, "
            "for the spec's own [data] dataset (not kept in a smoke test's stored spec)")
    if choice is not None and choice.fallback:
        text += f", and {choice.dataset} is its fallback ({choice.reason})"
    return text + "."


def data_sentences(folder: str | Path, spec) -> list[str]:
    """The report intro's data sentences: ``trained_on`` where the data differs from the declared, else the
    data choice of a spec with a [data] fallback (``data_sentence``), else none."""
    choice = data_choice(folder)
    differs = trained_on(spec, choice)
    if differs is not None:
        return [differs]
    return [data_sentence(choice)] if choice is not None else []


def drift_note(layer: str) -> str:
    tenth = f"{FRACTION:.0%}" if FRACTION != 0.1 else "tenth"
    return (f"Drift of the input to {layer} (the last hidden activation layer), Fig. 1(b, c)'s question of how much "
            f"its distribution moves during training. Per run and per percentile series (over all units, and each "
            f"tracked unit alone, on the fixed probe batch): drift = |mean over the sampled steps in the last {tenth} "
            f"of training - mean over those in the first {tenth}| (step 1, the initial weights, is in the first). "
            "Absolute, because a tracked unit is a different neuron in each seed, whose change has an arbitrary sign. "
            "Per variant: the mean over seeds ± the half-width of its 95% t interval; difference: the mean of the "
            "per-seed differences from the first variant over the seeds both have (paired: a seed's runs share the "
            "data order) ± its 95% t interval. No interval with fewer than 3 seeds.")


def drift_table(probes: list[dict], runs: list[dict], variants: list[str], layer: str | None,
                smoke_test: bool = False) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the drift table; no rows without percentile probes or with one variant only."""
    if layer is None:
        return [], []
    rows = drift_rows(probes, runs, variants, layer)
    if not rows:
        return [], []
    header = ["percentile of the input"] + [f"{v}: drift" for v in variants] + [
        f"{v} - {variants[0]}" for v in variants[1:]]
    out = [[r.quantity] + [r.per_variant[v].text(3) for v in variants] + [r.differences[v].text(3)
                                                                           for v in variants[1:]] for r in rows]
    if smoke_test:
        header[0] += " (smoke test: numbers only)"
    return header, out


__all__ = ["data_choice", "data_sentence", "data_sentences", "declared_dataset", "drift_note", "drift_table",
           "trained_on"]
