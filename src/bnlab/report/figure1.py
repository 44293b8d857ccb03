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


__all__ = ["data_choice", "data_sentence", "drift_note", "drift_table"]
