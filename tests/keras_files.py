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
