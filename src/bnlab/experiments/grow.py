"""Experiments can grow: which spec may join the spec stored in an experiment folder.

The rule: a spec joins a folder's stored spec when it differs only in its seeds and in which
variants it has; every other setting (of the experiment, its data, model, training, probes,
quick scale, and of each variant both hold) must be equal, defaults filled in, so a field added
to bnlab since does not count as a change. The folder then holds the union: the stored seeds and
variants first, in their order, then the new ones. A spec with fewer seeds or variants adds
nothing and never shrinks the union: the runs it leaves out stay in the folder, and in its report.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from bnlab.experiments.spec import ExperimentSpec
from bnlab.train.resume import setting_differences


class SpecChanged(ValueError):
    """A spec that changes a setting of the stored experiment; ``differences``: each as
    'dotted.path old -> new' (stored -> now)."""

    def __init__(self, differences: list[str]):
        self.differences = differences
        super().__init__("; ".join(differences))


@dataclass
class Growth:
    """How ``spec`` joins the stored one: ``union`` is the spec the folder holds from now on."""

    union: ExperimentSpec
    added_seeds: list[int] = field(default_factory=list)
    added_variants: list[str] = field(default_factory=list)
    left_out_seeds: list[int] = field(default_factory=list)  # stored, not asked for now
    left_out_variants: list[str] = field(default_factory=list)

    @property
    def grew(self) -> bool:
        return bool(self.added_seeds or self.added_variants)

    def notes(self) -> list[str]:
        """What the user should be told, one sentence each."""
        out = []
        if self.added_variants:
            out.append(f"adding variant(s) {', '.join(self.added_variants)} to the experiment")
        if self.added_seeds:
            out.append(f"adding seed(s) {_seeds(self.added_seeds)} to the experiment")
        if self.left_out_seeds or self.left_out_variants:
            what = " and ".join(w for w in (
                f"seed(s) {_seeds(self.left_out_seeds)}" if self.left_out_seeds else "",
                f"variant(s) {', '.join(self.left_out_variants)}" if self.left_out_variants else "") if w)
            out.append(f"the folder's experiment also has {what}, which this command does not ask for: their runs "
                       f"are kept (and reported) but not run now; the stored spec is not shrunk "
                       f"({len(self.union.seed_list())} seeds x {len(self.union.variants)} variants)")
        return out


def _seeds(seeds: list[int]) -> str:
    return ", ".join(map(str, seeds))


def spec_data(spec: ExperimentSpec | dict) -> dict:
    """The spec as JSON-able data with today's defaults filled in (a dict that no longer validates is
    taken as it is: it then differs from any valid spec)."""
    data = spec.model_dump(mode="json") if isinstance(spec, ExperimentSpec) else spec
    if not isinstance(data, dict):
        raise ValueError(f"the stored spec is not an experiment spec (a JSON {type(data).__name__})")
    try:
        return ExperimentSpec(**data).model_dump(mode="json")
    except (ValueError, TypeError):
        return json.loads(json.dumps(data))


def grow(stored: ExperimentSpec | dict, spec: ExperimentSpec) -> Growth:
    """How ``spec`` joins ``stored`` (see the module's rule); raises SpecChanged naming every other
    setting that differs."""
    old, new = spec_data(stored), spec_data(spec)
    shared = [v for v in new.get("variants", {}) if v in old.get("variants", {})]

    def settings(d: dict) -> dict:  # what must be equal: everything but seeds and unshared variants
        return {**{k: v for k, v in d.items() if k not in ("seeds", "variants")},
                "variants": {v: d["variants"][v] for v in shared}}

    differences = setting_differences(settings(old), settings(new))
    if differences:
        raise SpecChanged(differences)
    try:
        old_spec = ExperimentSpec(**old)
    except ValueError as e:  # its seeds or a variant the new spec lacks (stored by an earlier bnlab)
        raise ValueError(f"the stored spec is not a valid experiment spec today: {e}") from None
    old_seeds, new_seeds = old_spec.seed_list(), spec.seed_list()
    added_seeds = [s for s in new_seeds if s not in old_seeds]
    seeds = old_seeds + added_seeds
    union_seeds: int | list[int] = len(seeds) if seeds == list(range(len(seeds))) else seeds
    added_variants = [v for v in spec.variants if v not in old_spec.variants]
    union = old_spec.model_copy(update={
        "seeds": union_seeds,
        "variants": {**old_spec.variants, **{v: spec.variants[v] for v in added_variants}}})
    return Growth(union, added_seeds, added_variants,
                  left_out_seeds=[s for s in old_seeds if s not in new_seeds],
                  left_out_variants=[v for v in old_spec.variants if v not in spec.variants])


__all__ = ["Growth", "SpecChanged", "grow", "spec_data"]
