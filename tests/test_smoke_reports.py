"""Smoke runs say nothing (issue 28 item 5): a --quick run's report (HTML, Markdown) and terminal table show each
run's numbers and the reason, never a p-value, trend, interaction or reading (``bnlab.report.build.report_mode``);
the same runs as a study still show them; a Ghost-BN arm, whose batch axis is not the reference's, is never read
against it; and every report and terminal says which dataset the runs trained on where it is not the declared one
(``bnlab.report.figure1.trained_on``)."""

from __future__ import annotations

import html
import json
import re
import shutil

import pytest
from typer.testing import CliRunner

from bnlab.cli import app
from bnlab.experiments import RunStore

# a grouped batch-size study in seconds: BatchNorm and GroupNorm at 4 and 16 images per batch, and a Ghost-BN arm
# that keeps the optimiser batch (16) and varies only the batch it normalises over (4, 8); 2 seeds, 1 epoch
GROUPED = """
name = "tiny-groups"
seeds = 2
reference_group = "GroupNorm"
[data]
dataset = "synthetic"
validation = 0.25
options = { n_train = 64, n_test = 32, features = 6, classes = 2 }
[model]
kind = "mlp"
input_shape = [6]
num_classes = 2
hidden = [8]
bn = "before"
[train]
lr = 0.05
epochs = 1
[variants.bn-b4]
group = "BatchNorm"
train = { batch_size = 4 }
[variants.bn-b16]
group = "BatchNorm"
train = { batch_size = 16 }
[variants.gn-b4]
group = "GroupNorm"
model = { norm = "group:2" }
train = { batch_size = 4 }
[variants.gn-b16]
group = "GroupNorm"
model = { norm = "group:2" }
train = { batch_size = 16 }
[variants.ghost-g4-b16]
group = "Ghost BN"
model = { norm = "ghost:4" }
train = { batch_size = 16 }
[variants.ghost-g8-b16]
group = "Ghost BN"
model = { norm = "ghost:8" }
train = { batch_size = 16 }
[quick]
seeds = 2
"""

# what a conclusion looks like in words: a p-value, a trend or interaction fit, a reading, a verdict
CONCLUSION = re.compile(r"\bp [=<>0-9]|\bp=|p-value|\bp \(unadjusted\)|\| p \||<th>p</th>|points per doubling|"
                        r"small batches hurt|no difference between the slopes|These runs do not separate|"
                        r"Holm-adjusted|reaches a higher|is more accurate", re.IGNORECASE)
REASON = "smoke test: 2 seeds, 1 epoch: the pipeline ran; no conclusions"


def _cli(*args) -> str:
    r = CliRunner().invoke(app, list(args), env={"COLUMNS": "200", "OMP_WAIT_POLICY": "PASSIVE"})
    assert r.exit_code == 0, r.output
    return r.output


def _set_smoke(folder, smoke: bool) -> None:
    store = RunStore(folder / "runs.sqlite")
    try:
        spec = json.loads(store.get_meta("spec"))
        store.set_meta(spec=json.dumps({**spec, "smoke_test": smoke}))
    finally:
        store.close()


@pytest.fixture(scope="module")
def grouped(tmp_path_factory):
    """(smoke folder, `bnlab run --quick` output, study folder): the same 12 runs, as a smoke test and as a study."""
    tmp = tmp_path_factory.mktemp("grouped")
    (tmp / "g.toml").write_text(GROUPED)
    out = _cli("run", str(tmp / "g.toml"), "--quick", "--out", str(tmp / "smoke"), "--workers", "1")
    shutil.copytree(tmp / "smoke", tmp / "study")
    _set_smoke(tmp / "study", False)  # the same runs, read as an experiment
    return tmp / "smoke", out, tmp / "study"


def test_a_smoke_report_and_terminal_draw_no_conclusions(grouped):
    smoke, run_output, _ = grouped
    compare_output = _cli("compare", str(smoke))
    md, page = (smoke / "report.md").read_text(), (smoke / "report.html").read_text()
    for where, text in (("bnlab run --quick", run_output), ("bnlab compare", compare_output), ("report.md", md),
                        ("report.html", page)):
        text = " ".join(html.unescape(text).split())  # the terminal wraps lines
        found = CONCLUSION.search(text)
        assert found is None, f"{where} draws a conclusion: {found.group(0)!r}"
        assert REASON in text, f"{where} does not say why it draws none"
    assert "## Trend with the images per device" not in md and "Against the reference method" not in md
    assert "No line is fitted or read: a smoke test." in md  # the figure's caption promises no trend table
    assert "| bn-b4 | 2: 2 done |" in md  # each run's numbers still show


def test_the_same_runs_as_a_study_show_trends_interactions_and_their_reading(grouped):
    _, _, study = grouped
    out = " ".join(_cli("compare", str(study)).split())
    CliRunner().invoke(app, ["report", str(study)])
    md, page = (study / "report.md").read_text(), (study / "report.html").read_text()
    for text in (out, md, page):
        assert "points per doubling" in text and "no conclusions" not in text
    assert re.search(r"GroupNorm, test error \(final model\): [-+][0-9.]+ points per doubling .*?, p [0-9.]", out)
    table = md.split("### Against the reference method")[1].split("\n## ")[0]
    bn = next(line for line in table.splitlines() if line.startswith("| BatchNorm | GroupNorm |"))
    assert re.search(r"\| [0-9.]+(e-[0-9]+)? \| (small batches hurt|no difference between the slopes)", bn)
    assert "<th>reading</th>" in page


def test_a_ghost_bn_arm_is_never_read_against_the_reference(grouped):
    """The Ghost-BN arm varies the statistics batch at one optimiser batch; GroupNorm varies the optimiser
    batch: one regression cannot compare them, so the row says why and has no p-value and no reading."""
    _, _, study = grouped
    table = (study / "report.md").read_text().split("### Against the reference method")[1].split("\n## ")[0]
    ghost = [line for line in table.splitlines() if line.startswith("| Ghost BN | GroupNorm |")]
    assert ghost and all("not tested: it varies the statistics batch, GroupNorm the optimiser batch" in line
                         and line.endswith("| - | - |") for line in ghost)


def test_a_fallback_dataset_is_named_in_the_report_and_the_terminal(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "f.toml").write_text(f"""
name = "tiny-fallback"
seeds = 1
[data]
dataset = "mnist"
data_dir = "{tmp_path / 'empty'}"
fallback = {{ dataset = "synthetic", options = {{ n_train = 40, n_test = 20, features = 4, classes = 2 }} }}
[model]
kind = "mlp"
input_shape = [4]
num_classes = 2
hidden = [4]
[train]
epochs = 1
batch_size = 16
[variants.a]
model = {{ bn = "before" }}
""")
    _cli("run", str(tmp_path / "f.toml"), "--out", str(tmp_path / "f"), "--workers", "1")
    said = "Data: synthetic, the spec's fallback for mnist"
    assert said in " ".join(_cli("compare", str(tmp_path / "f")).split())
    assert said in (tmp_path / "f" / "report.md").read_text()
    assert said in html.unescape((tmp_path / "f" / "report.html").read_text())


def test_a_quick_scale_that_swaps_the_dataset_says_so():
    """seed-001-fashion --quick trains on the embedded MNIST digits: the sentence names both datasets."""
    from bnlab.experiments import apply_quick, load_experiment
    from bnlab.report.figure1 import trained_on

    preset = load_experiment("seed-001-fashion")
    assert preset.data.dataset == "fashion-mnist"
    quick = apply_quick(preset)
    assert trained_on(quick, None) == ("Trained on mnist-5k, not fashion-mnist, the preset's dataset: the smoke "
                                       "test (--quick) swaps in mnist-5k.")
    assert trained_on(preset, None) is None  # the full run trains on what it declares
    assert trained_on(apply_quick(load_experiment("demo")), None) is None  # a quick scale on the same data
    # a spec file's quick swap: the dataset trained on is named, and that the declared one was replaced
    own = quick.model_copy(update={"name": "my-fashion"})
    assert trained_on(own, None).startswith("Trained on mnist-5k: the smoke test (--quick) swaps in mnist-5k")
