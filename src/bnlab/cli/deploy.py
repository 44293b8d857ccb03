"""Inference tools: recalibrate, fold, predict, export, serve."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from bnlab.cli.app import (_fail, app, check_out_file, check_out_folder, console, describe_error, say,
                           trust_factory_option, warn)


def _checkpoint(path: Path, trust_factory: bool):
    """The checkpoint at ``path`` (a checkpoint folder, or a run folder's best model), or a clean exit."""
    return _chosen_checkpoint(path, None, trust_factory)


def _checkpoint_data(ck, dataset: str | None, data_dir: str | None):
    """The dataset a checkpoint was trained on (same split and scaling), or another one."""
    from bnlab.data import load_dataset

    train = ck.meta.get("train") or {}
    name = dataset or ck.meta.get("dataset") or train.get("dataset")
    if not name:
        _fail("the checkpoint does not say which dataset it was trained on: pass --dataset")
    same = name == train.get("dataset")
    return load_dataset(name, data_dir=data_dir or train.get("data_dir"),
                        validation=train.get("validation") if same else None,
                        scaling=train.get("scaling") if same else None, seed=train.get("data_seed", 0),
                        **(train.get("dataset_options", {}) if same else {}))


@app.command()
def recalibrate(
    checkpoint: Path = typer.Argument(..., help="A checkpoint folder (model.safetensors + config.json), or a run "
                                      "folder (its best-validation model)."),
    out: Path = typer.Option(..., help="Folder for the recalibrated checkpoint."),
    dataset: str = typer.Option(None, help="Default: the dataset the checkpoint was trained on."),
    data_dir: str = typer.Option(None, "--data-dir"),
    batch_size: int = typer.Option(None, "--batch-size", min=1, max=1 << 20,  # TrainConfig's batch bounds
                                   help="Samples per forward pass (mode train: the batch whose "
                                   "statistics earlier BN layers normalize with). Default: the checkpoint's "
                                   "training batch size, else 32."),
    mode: str = typer.Option("inference", help="inference (default; the 'precise statistics' of bnlab train and "
                             "the reports): layer by layer, earlier layers already on their new statistics, i.e. "
                             "the network as deployed | train: earlier BN layers use batch statistics, as in "
                             "training (fvcore's PreciseBN) | both: compute and print both, write inference."),
    seed: int = typer.Option(0, min=0, max=2**31 - 1,  # the range of TrainConfig's seeds
                             help="Seed of the shuffle into batches (mode train depends on it)."),
    trust_factory: bool = trust_factory_option(),
) -> None:
    """Replace BN's moving averages by precise population statistics over the training data (per channel, the
    mean and variance over all values each BN layer sees, with the weights fixed), print validation loss and
    accuracy with the moving averages and with each mode, and write the checkpoint of the chosen mode.
    The default, mode inference, writes the statistics the reports and bnlab train call precise
    (--mode both prints both modes and writes inference too); the mode written is printed and recorded in the
    checkpoint's meta ("recalibrated": mode, batch_size, seed, examples).

    Example: bnlab recalibrate runs/one/checkpoint --out runs/one/precise
    """
    from bnlab.checkpoint import CheckpointError, save_checkpoint
    from bnlab.data import ChecksumError, CorruptFileError, DatasetUnavailable
    from bnlab.deploy import recalibrate as recal
    from bnlab.deploy.predict import in_model_layout
    from bnlab.train import evaluate

    # the first mode listed is the one written; "both" writes the reports' mode (inference)
    modes = {"inference": ["inference"], "train": ["train"], "both": ["inference", "train"]}
    if mode not in modes:
        _fail(f"--mode must be one of train, inference, both (got {mode!r})")
    written = modes[mode][0]
    check_out_folder(out, "--out", "the recalibrated checkpoint")
    ck = _checkpoint(checkpoint, trust_factory)
    say(f"model: {ck.describe()}")
    if batch_size is None:
        batch_size = int((ck.meta.get("train") or {}).get("batch_size") or 32)
    new = {}
    try:
        data = in_model_layout(_checkpoint_data(ck, dataset, data_dir), ck.model.spec)  # Keras: (N, H, W, C)
        for m in modes[mode]:
            new[m] = recal(ck.model, data.x_train, batch_size=batch_size, mode=m, seed=seed)
    except (DatasetUnavailable, ChecksumError, CorruptFileError, ValueError, FloatingPointError, OSError,
            MemoryError) as e:
        _fail(describe_error(e))
    table = Table(title=escape(f"validation on {data.name} ({len(data.y_val)} examples); statistics over "
                               f"{len(data.x_train)} training examples"), title_justify="left")
    for col in ("BN statistics", "val loss", "val accuracy"):
        table.add_column(col)
    loss, acc = evaluate(ck.model, data.x_val, data.y_val)
    table.add_row("moving averages", f"{loss:.4f}", f"{acc:.4f}")
    for m, model in new.items():
        loss, acc = evaluate(model, data.x_val, data.y_val)
        label = f"precise, mode {m}" + (f" (batch {batch_size})" if m == "train" else "")
        table.add_row(label, f"{loss:.4f}", f"{acc:.4f}")
    # accuracies measured with the old statistics no longer describe these weights: drop them
    measured = {k for k in ck.meta if k.endswith(("_accuracy", "_loss"))}
    new_loss, new_acc = evaluate(new[written], data.x_val, data.y_val)
    try:
        save_checkpoint(out, new[written], preprocessing=ck.preprocessing,
                        meta={**{k: v for k, v in ck.meta.items() if k not in measured},
                              "val_accuracy": new_acc, "val_loss": new_loss,
                              "recalibrated": {"mode": written, "batch_size": batch_size, "seed": seed,
                                               "examples": len(data.x_train)}})
    except CheckpointError as e:
        _fail(str(e))
    console.print(table)
    say(f"wrote {out} (precise statistics, mode {written}" + (f", batch {batch_size}" if written == "train" else "")
        + f", over {len(data.x_train)} training examples)")


@app.command("fold")
def fold_cmd(
    checkpoint: Path = typer.Argument(..., help="A checkpoint folder."),
    out: Path = typer.Option(..., help="Folder for the folded checkpoint."),
    trust_factory: bool = trust_factory_option(),
) -> None:
    """Fold every foldable BN into its neighbouring Linear/Conv and print the fold report
    (which BN went where, and why any stayed).

    Example: bnlab fold runs/one/checkpoint --out runs/one/folded
    """
    import torch

    from bnlab.checkpoint import CheckpointError, save_checkpoint
    from bnlab.deploy import describe, fold
    from bnlab.models import build_model

    check_out_folder(out, "--out", "the folded checkpoint")
    ck = _checkpoint(checkpoint, trust_factory)
    folded, rep = fold(ck.model)
    spec = ck.model.spec
    try:  # a plain layer list where one describes it; else "this spec's model, folded" (strides, factories)
        rebuilt = build_model(describe(folded, input_shape=spec.input_shape, num_classes=spec.num_classes))
        rebuilt.load_state_dict(folded.state_dict())
    except (ValueError, TypeError, AttributeError):
        rebuilt = folded
        rebuilt.spec = spec.model_copy(update={"folded": True})
    rebuilt.eval()
    x = torch.randn(16, *spec.input_shape)
    with torch.no_grad():
        a, b = ck.model(x), rebuilt(x)
    err = float((a - b).abs().max() / a.abs().max().clamp_min(1e-30))
    try:
        save_checkpoint(out, rebuilt, preprocessing=ck.preprocessing, meta={**ck.meta, "folded": rep.to_text()})
    except CheckpointError as e:  # e.g. folding overflowed float32: refused, not written
        _fail(str(e))
    say(rep.to_text())
    say(f"max relative output difference on random inputs: {err:.2e}; wrote {out}")


_MODEL_HELP = ("Which model of a run folder: best (the best-validation model, checkpoint/; the default, as Keras's "
               "save_best_only) or final (checkpoint-final/). With a checkpoint folder it must match that checkpoint.")
_BN_STATS_HELP = ("Which statistics BN uses: running (its moving averages; the default), batch (the statistics of the "
                  "inputs sent together: a file, or a request; one sample cannot be normalised by a BN over "
                  "features) or recalibrated (precise statistics over --recalibrate-on inputs of the test domain).")
_RECALIBRATE_ON_HELP = ("Unlabeled inputs of the test domain (images or .npy, raw values like the inputs; repeat for "
                        "several files) to recalibrate BN on, for --bn-stats recalibrated.")


def _chosen_checkpoint(path: Path, which: str | None, trust_factory: bool):
    """The checkpoint at ``path`` (a checkpoint folder, or a run folder and --model), or a clean exit."""
    from bnlab.checkpoint import CheckpointError, load_checkpoint

    try:
        return load_checkpoint(path, which=which, trust_factory=trust_factory)
    except CheckpointError as e:
        _fail(str(e))


@app.command("predict")
def predict_cmd(
    checkpoint: Path = typer.Argument(..., help="A checkpoint folder, or a run folder (then --model picks which)."),
    inputs: list[Path] = typer.Argument(..., help="PNG/JPEG images or .npy arrays (one sample or a batch; images "
                                        "channels first or, as Keras has them, channels last: (N, H, W) or (N, H, W, C))."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    prescaled: bool = typer.Option(False, "--prescaled", help="Inputs are already scaled like the training data."),
    which: str = typer.Option(None, "--model", help=_MODEL_HELP),
    bn_stats: str = typer.Option("running", "--bn-stats", help=_BN_STATS_HELP),
    recalibrate_on: list[Path] = typer.Option(None, "--recalibrate-on", help=_RECALIBRATE_ON_HELP),
    trust_factory: bool = trust_factory_option(),
) -> None:
    """Predict the class of images or arrays; single samples work (eval mode).

    Inputs are raw values as in the dataset files (pixels 0..255); the checkpoint's preprocessing
    (fitted on its training split) is applied unless --prescaled. Says which model it used (best or
    final, its epoch); with --json, each prediction's "model" and "epoch".

    Example: bnlab predict runs/one digit.png --model best --json
    Shifted test data: bnlab predict runs/one shifted.npy --bn-stats recalibrated --recalibrate-on shifted.npy
    """
    import warnings

    from bnlab.deploy.predict import LooksPrescaled, predict_files

    try:  # CheckpointError, InputError (non-finite outputs included: never 'p = nan'), both ValueErrors
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", LooksPrescaled)
            ck, results = predict_files(checkpoint, inputs, which=which, prescaled=prescaled, bn_stats=bn_stats,
                                        recalibrate_on=recalibrate_on or (), trust_factory=trust_factory)
    except ValueError as e:
        _fail(str(e))
    for w in caught:
        if issubclass(w.category, LooksPrescaled):
            warn(str(w.message))
    if as_json:
        print(json.dumps(results, indent=2, allow_nan=False))  # strict JSON: predict() refused NaN above
        return
    say(f"model: {ck.describe()}")
    for r in results:
        top = sorted(range(len(r["probabilities"])), key=lambda k: -r["probabilities"][k])[:3]
        say(f"{r['input']}: class {r['class']} ({r['name']}), p = {r['probabilities'][r['class']]:.4f}; "
            "top 3: " + ", ".join(f"{k}: {r['probabilities'][k]:.3f}" for k in top))


@app.command()
def export(
    checkpoint: Path = typer.Argument(..., help="A checkpoint folder, or a run folder (then --model picks which)."),
    onnx: Path = typer.Option(..., "--onnx", help="Output .onnx file."),
    no_fold: bool = typer.Option(False, "--no-fold", help="Export without folding BN first."),
    which: str = typer.Option(None, "--model", help=_MODEL_HELP),
    softmax: bool = typer.Option(False, "--softmax", help="Output probabilities (a final softmax) instead of logits."),
    trust_factory: bool = trust_factory_option(),
) -> None:
    """Export a checkpoint to ONNX (BN folded first) taking RAW inputs like bnlab predict (the
    checkpoint's preprocessing is part of the graph), and check onnxruntime against bnlab predict.

    Says which model it exported (best or final, its epoch) and records in the ONNX file's metadata
    what it is: bnlab.model, bnlab.epoch, bnlab.version, bnlab.spec_sha256, bnlab.input_layout,
    bnlab.preprocessing, bnlab.outputs, bnlab.classes. Needs the optional extra: pip install 'bnlab\\[onnx]'.

    Example: bnlab export runs/one --model best --onnx model.onnx --softmax
    """
    import numpy as np

    from bnlab.deploy import fold, predict
    from bnlab.deploy.export import export_onnx, onnx_predict, raw_sample

    check_out_file(onnx, "--onnx", "the ONNX model")
    ck = _chosen_checkpoint(checkpoint, which, trust_factory)
    model = ck.model if no_fold else fold(ck.model)[0]
    shape = tuple(ck.model.spec.input_shape)
    x = raw_sample(shape, ck.preprocessing)  # raw-looking inputs, as predict takes them
    try:
        export_onnx(model, shape, onnx, preprocessing=ck.preprocessing, softmax=softmax,
                    classes=ck.meta.get("classes"), spec=ck.model.spec,
                    metadata={"bnlab.model": ck.kind, "bnlab.epoch": ck.meta.get("epoch"),
                              "bnlab.checkpoint": str(ck.path), "bnlab.folded": not no_fold})
        got = onnx_predict(onnx, x)
    except ImportError as e:
        _fail(str(e))
    except OSError as e:  # a folder or a file in the way, a full disk, no permission
        _fail(f"--onnx {onnx}: cannot write it ({describe_error(e)})")
    except ValueError as e:  # a model that answers non-finite outputs: refused before anything is written
        _fail(str(e))
    try:
        probs = np.array([p.probabilities for p in predict(ck.model, x, ck.preprocessing)])
    except ValueError as e:  # InputError: non-finite outputs of the unfolded model
        _fail(str(e))
    if not softmax:
        got = np.exp(got - got.max(1, keepdims=True))
        got /= got.sum(1, keepdims=True)
    err = float(np.abs(got - probs).max())
    say(f"exported the {ck.describe()}")
    say(f"wrote {onnx} (raw inputs in, {'probabilities' if softmax else 'logits'} out); onnxruntime vs bnlab "
        f"predict on raw inputs: max probability difference {err:.2e}")


@app.command()
def serve(
    checkpoint: Path = typer.Argument(..., help="A checkpoint folder, or a run folder (then --model picks which)."),
    host: str = typer.Option("127.0.0.1"),
    port: int = typer.Option(8000, min=0, max=65535, help="0: any free port (the start message says which)."),
    max_body_bytes: int = typer.Option(None, "--max-body-bytes", help="Larger bodies get 413. Default: 4 MiB, "
                                       "enough for a full batch (1024 samples) of MNIST as JSON."),
    max_image_pixels: int = typer.Option(None, "--max-image-pixels", help="Larger images get 413, read from "
                                         "their header before decoding. Default: 4096x4096 (a phone photo), or "
                                         "256 times the model's input area if larger."),
    decoders: int = typer.Option(None, "--decoders", help="Processes that decode request bodies (JSON, "
                                 "images) off the event loop. Default: 2."),
    body_seconds: float = typer.Option(None, "--body-seconds", help="A request body not all in within this "
                                       "many seconds of the request's arrival (and at least 5 s after the "
                                       "server began reading it) gets 408 and the connection closes: a slow "
                                       "client would hold its share of the body budget. Default: 60."),
    which: str = typer.Option(None, "--model", help=_MODEL_HELP),
    bn_stats: str = typer.Option("running", "--bn-stats", help=_BN_STATS_HELP),
    recalibrate_on: list[Path] = typer.Option(None, "--recalibrate-on", help=_RECALIBRATE_ON_HELP),
    trust_factory: bool = trust_factory_option(),
) -> None:
    """Serve a checkpoint over REST: POST /predict, GET /health, GET /model, /docs.

    Says which model it serves (best or final, its epoch), at start and in every answer. Bad input
    gets a 4xx with a message, never a 5xx; the limits are in /openapi.json and /docs. SIGINT
    (Ctrl-C) or SIGTERM stops it gracefully: requests in flight are answered, then it exits 0.
    Needs the optional extra: pip install 'bnlab\\[serve]'.

    Example: bnlab serve runs/one --model best --port 8000
    """
    import signal

    try:
        import uvicorn

        from bnlab.deploy.serve import create_app
    except ImportError:
        _fail("serving needs the optional extra: pip install 'bnlab[serve]'")
    ck = _chosen_checkpoint(checkpoint, which, trust_factory)  # a clear error before the server starts
    limits = {k: v for k, v in {"max_body_bytes": max_body_bytes, "max_image_pixels": max_image_pixels,
                                "decoders": decoders, "body_seconds": body_seconds}.items() if v is not None}
    try:
        application = create_app(ck, **limits, bn_stats=bn_stats, recalibrate_on=recalibrate_on or ())
    except ValueError as e:
        _fail(str(e))
    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # uvicorn's signal handler: stopping begins
            application.stop_reading()  # bodies still on their way get 408 before uvicorn's 30 s run out
            super().handle_exit(sig, frame)

    server = Server(uvicorn.Config(application, host=host, port=port, timeout_graceful_shutdown=30))

    # uvicorn answers SIGINT/SIGTERM with a graceful shutdown, then restores the handlers it found and
    # raises the signal again, which would kill the process after a clean stop; these handlers make
    # that a no-op (and stop the server if a signal comes before uvicorn installs its own).
    def stop(signum, frame):
        server.should_exit = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    say(f"serving the {ck.describe()}" + (f", BN statistics: {bn_stats}" if bn_stats != "running" else ""))
    server.run()
    if not server.started:
        _fail(f"the server did not start on {host}:{port} (uvicorn's message above says why)")
    say("stopped: every request in flight was answered")
