"""The Keras models the Keras-import tests read, built with whichever Keras is given: Keras 3 (torch
backend, in the tests) or tf.keras 2 (``tests/data/keras2/make.py``, which wrote the committed Keras 2
files). Every BN gets random gamma, beta and moving statistics, so a wrong eps, momentum, axis or
permutation shows in the outputs."""

from __future__ import annotations

import numpy as np


def _randomise_bn(model, rng: np.random.Generator) -> None:
    for layer in model.layers:
        if type(layer).__name__ == "BatchNormalization":
            weights = []
            for w in layer.get_weights():  # gamma, beta, moving_mean, moving_variance (the enabled ones)
                weights.append(rng.normal(0, 0.5, w.shape).astype("float32"))
            names = [v.name.split("/")[-1].split(":")[0] for v in layer.weights]
            for i, n in enumerate(names):
                if n in ("gamma",):
                    weights[i] = rng.uniform(0.5, 1.5, weights[i].shape).astype("float32")
                if n in ("moving_variance",):
                    weights[i] = rng.uniform(0.2, 2.0, weights[i].shape).astype("float32")
            layer.set_weights(weights)


def seed_mlp(keras, functional: bool = False):
    """Seed 001's Fashion-MNIST MLP, narrowed: input BN, BN before and after the activation, dropout."""
    L = keras.layers
    layers = [L.Flatten(), L.BatchNormalization(), L.Dense(32), L.BatchNormalization(), L.Activation("relu"),
              L.Dense(16, activation="relu"), L.BatchNormalization(momentum=0.9, epsilon=1e-2), L.Dropout(0.3),
              L.Dense(10, activation="softmax")]
    if not functional:
        return keras.Sequential([keras.Input((28, 28))] + layers)
    x = inp = keras.Input((28, 28))
    for layer in layers:
        x = layer(x)
    return keras.Model(inp, x)


def seed_cnn(keras, filters=(4, 6, 8, 8, 8)):
    """Seed 002's 5-block CNN, narrowed: conv, BN, ReLU, max-pool, dropout per block (the last block
    unpooled); Flatten of the 2x2 map; BN of the flat features; dense head."""
    L = keras.layers
    layers = [keras.Input((32, 32, 3))]
    for i, f in enumerate(filters):
        layers += [L.Conv2D(f, 3, padding="same"), L.BatchNormalization(), L.Activation("relu")]
        if i < len(filters) - 1:  # the last block is not pooled: Flatten sees a 2x2 map (order matters)
            layers += [L.MaxPooling2D(2), L.Dropout(0.25)]
    layers += [L.Flatten(), L.BatchNormalization(), L.Dense(12, activation="elu"), L.Dense(10, activation="softmax")]
    return keras.Sequential(layers)


def zoo_cnn(keras):
    """The other supported layers: strided 'same' convs (asymmetric padding), valid convs, LeakyReLU,
    ELU, average pooling, BN with center / scale off, global average pooling, a Softmax layer."""
    L = keras.layers
    return keras.Sequential([
        keras.Input((13, 11, 2)), L.Conv2D(5, 3, strides=2, padding="same"), L.BatchNormalization(center=False),
        L.LeakyReLU(negative_slope=0.1) if hasattr(L.LeakyReLU(), "negative_slope") else L.LeakyReLU(alpha=0.1),
        L.Conv2D(6, 2, padding="same", use_bias=False), L.BatchNormalization(scale=False), L.ELU(),
        L.AveragePooling2D(2, strides=1), L.Conv2D(7, 3, padding="valid", activation="tanh"),
        L.GlobalAveragePooling2D(), L.Dense(4, activation="selu"), L.Dense(3), L.Softmax()])


def models(keras, seed: int = 0) -> dict:
    """name -> (model, inputs in the Keras model's layout)."""
    rng = np.random.default_rng(seed)
    out = {"mlp": (seed_mlp(keras), rng.uniform(0, 1, (6, 28, 28)).astype("float32")),
           "cnn": (seed_cnn(keras), rng.uniform(0, 1, (4, 32, 32, 3)).astype("float32")),
           "zoo": (zoo_cnn(keras), rng.normal(0, 1, (5, 13, 11, 2)).astype("float32"))}
    for model, _ in out.values():
        _randomise_bn(model, rng)
    return out


# ---- small Keras files written with h5py and zipfile alone (no Keras): the hostile-file tests edit these

def tiny_keras3_config(units: int = 3, epsilon: float = 1e-3, features: int = 4) -> dict:
    """A Keras 3 ``config.json``: Input(features) -> Dense(units) -> BatchNormalization -> Dense(2, softmax)."""
    def layer(cls, name, config, shape):
        return {"module": "keras.layers", "class_name": cls, "config": {"name": name, "dtype": "float32", **config},
                "build_config": {"input_shape": [None, *shape]}}

    return {"module": "keras", "class_name": "Sequential", "config": {"name": "sequential", "layers": [
        {"module": "keras.layers", "class_name": "InputLayer",
         "config": {"batch_shape": [None, features], "dtype": "float32", "name": "input_layer"}},
        layer("Dense", "dense", {"units": units, "activation": "linear", "use_bias": True}, [features]),
        layer("BatchNormalization", "batch_normalization", {"axis": -1, "momentum": 0.99, "epsilon": epsilon,
                                                            "center": True, "scale": True}, [units]),
        layer("Dense", "dense_1", {"units": 2, "activation": "softmax", "use_bias": True}, [units])]}}


def tiny_weights(units: int = 3, features: int = 4) -> dict[str, list[np.ndarray]]:
    """Keras-order arrays of the tiny model's weight layers (Keras 3 snake-case paths)."""
    rng = np.random.default_rng(0)

    def f32(*shape):
        return rng.normal(0, 0.5, shape).astype("float32")

    return {"dense": [f32(features, units), f32(units)],
            "batch_normalization": [1 + 0.1 * f32(units), f32(units), f32(units), 1 + np.abs(f32(units))],
            "dense_1": [f32(units, 2), f32(2)]}


def write_keras3_weights(path, weights: dict[str, list[np.ndarray]] | None = None, edit=None) -> None:
    """``model.weights.h5`` as Keras 3 writes it (``layers/<name>/vars/<i>``); ``edit(h5file)`` runs last."""
    import h5py

    with h5py.File(path, "w") as f:
        for lname, arrays in (tiny_weights() if weights is None else weights).items():
            group = f.create_group(f"layers/{lname}/vars")
            for i, a in enumerate(arrays):
                group.create_dataset(str(i), data=a)
        if edit is not None:
            edit(f)


def write_keras_zip(path, *, config: dict | None = None, config_bytes: bytes | None = None,
                    weights_file=None, members: dict | None = None, compression: int | None = None) -> None:
    """A ``.keras`` archive of the tiny model: config.json (``config`` or raw ``config_bytes``), metadata.json
    and model.weights.h5 (a file written by ``write_keras3_weights`` unless given); ``members`` add or replace
    raw members (name -> bytes, or an iterable of byte chunks streamed in)."""
    import json
    import tempfile
    import zipfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        if weights_file is None:
            weights_file = Path(tmp) / "model.weights.h5"
            write_keras3_weights(weights_file)
        parts = {"metadata.json": json.dumps({"keras_version": "3.15.1"}).encode(),
                 "config.json": config_bytes if config_bytes is not None else json.dumps(
                     config or tiny_keras3_config()).encode(),
                 "model.weights.h5": Path(weights_file).read_bytes(), **(members or {})}
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED if compression is None else compression) as z:
            for name, data in parts.items():
                if isinstance(data, bytes):
                    z.writestr(name, data)
                else:
                    with z.open(name, "w", force_zip64=True) as out:
                        for chunk in data:
                            out.write(chunk)


def tiny_keras2_config(units: int = 3, epsilon: float = 1e-3, features: int = 4) -> dict:
    """The tiny model's ``model_config`` as tf.keras 2 writes it."""
    return {"class_name": "Sequential", "config": {"name": "sequential", "layers": [
        {"class_name": "InputLayer", "config": {"batch_input_shape": [None, features], "dtype": "float32",
                                                "name": "input_1"}},
        {"class_name": "Dense", "config": {"name": "dense", "units": units, "activation": "linear", "use_bias": True}},
        {"class_name": "BatchNormalization", "config": {"name": "batch_normalization", "axis": [1],
                                                        "momentum": 0.99, "epsilon": epsilon,
                                                        "center": True, "scale": True}},
        {"class_name": "Dense", "config": {"name": "dense_1", "units": 2, "activation": "softmax",
                                           "use_bias": True}}]}}


KERAS2_WEIGHT_NAMES = {"dense": ["kernel:0", "bias:0"],
                       "batch_normalization": ["gamma:0", "beta:0", "moving_mean:0", "moving_variance:0"],
                       "dense_1": ["kernel:0", "bias:0"]}


def write_keras2_h5(path, *, config: dict | None = None, model_config: str | None = None, edit=None) -> None:
    """A Keras 2 ``.h5`` of the tiny model (root attrs, ``model_weights/<layer>/<layer>/<name>:0``);
    ``edit(h5file)`` runs last."""
    import json

    import h5py

    weights = tiny_weights()
    with h5py.File(path, "w") as f:
        f.attrs["model_config"] = (model_config if model_config is not None
                                   else json.dumps(config or tiny_keras2_config()))
        f.attrs["keras_version"] = "2.15.0"
        f.attrs["backend"] = "tensorflow"
        mw = f.create_group("model_weights")
        mw.attrs["layer_names"] = [n.encode() for n in ["input_1", *KERAS2_WEIGHT_NAMES]]
        mw.create_group("input_1").attrs["weight_names"] = np.array([], dtype="S1")
        for lname, wnames in KERAS2_WEIGHT_NAMES.items():
            group = mw.create_group(lname)
            group.attrs["weight_names"] = [f"{lname}/{w}".encode() for w in wnames]
            for w, a in zip(wnames, weights[lname]):
                group.create_dataset(f"{lname}/{w}", data=a)
        if edit is not None:
            edit(f)
