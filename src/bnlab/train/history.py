"""What a training run produced, as plain data (JSON-able)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields


@dataclass
class EpochRecord:
    epoch: int  # 1-based
    train_loss: float
    train_accuracy: float
    val_loss: float | None
    val_accuracy: float | None
    seconds: float  # wall time of the epoch's training steps + evaluation
    steps: int  # optimizer steps so far


@dataclass
class History:
    epochs: list[EpochRecord] = field(default_factory=list)
    step_loss: list[float] = field(default_factory=list)
    target_accuracy: float | None = None
    # first time validation accuracy reached the target (None: never)
    steps_to_target: int | None = None
    epochs_to_target: int | None = None
    seconds_to_target: float | None = None
    stopped: str = "completed"  # completed | early_stopping | budget | diverged | interrupted
    message: str = ""
    best_epoch: int | None = None
    engine: str = ""
    precision: str = "fp32"  # bnlab.train.precision
    devices: int = 1  # data-parallel processes (bnlab.train.distributed)
    probes: list = field(default_factory=list)  # (step, layer, metric, value) rows, see bnlab.probes

    def record(self, rec: EpochRecord, elapsed: float) -> None:
        self.epochs.append(rec)
        if (self.target_accuracy is not None and self.steps_to_target is None
                and rec.val_accuracy is not None and rec.val_accuracy >= self.target_accuracy):
            self.steps_to_target, self.epochs_to_target = rec.steps, rec.epoch
            self.seconds_to_target = elapsed

    @property
    def final(self) -> EpochRecord | None:
        return self.epochs[-1] if self.epochs else None

    def to_dict(self) -> dict:
        """As ``dataclasses.asdict`` gives it, without its deep copy of every float (~20 ms for
        17,000 step losses, paid at every epoch's resumable state)."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["epochs"] = [asdict(e) for e in self.epochs]
        d["step_loss"] = list(self.step_loss)
        d["probes"] = [list(r) for r in self.probes]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "History":
        d = dict(d)
        d["epochs"] = [EpochRecord(**e) for e in d.get("epochs", [])]
        return cls(**d)
