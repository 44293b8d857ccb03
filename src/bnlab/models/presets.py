"""Named model specs for every network in the seed notebooks (and the paper's MLP)."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

from bnlab.textfile import read_text_file
from bnlab.models.spec import parse_model_spec

_FASHION = {"kind": "mlp", "input_shape": [1, 28, 28], "num_classes": 10, "hidden": [300, 100],
            "norm_options": {"convention": "keras"}}
_CIFAR = {"kind": "cnn", "input_shape": [3, 32, 32], "num_classes": 100, "blocks": [60, 60, 60, 60],
          "final_block": 100, "dropout": 0.15, "head": "flatten", "activation": "relu", "bias": "on",
          "norm_options": {"convention": "keras"}}
_PAPER = {"kind": "mlp", "input_shape": [1, 28, 28], "num_classes": 10, "hidden": [100, 100, 100],
          "activation": "sigmoid", "init": "normal", "init_std": 0.1}

MODEL_PRESETS: dict[str, tuple[str, dict]] = {
    "fashion-mlp-baseline": ("seed 001: 300-100 LeakyReLU(0.3) MLP, he_normal, no BN (266,610 params)",
                             {**_FASHION, "activation": "leaky_relu", "init": "he_normal"}),
    "fashion-mlp-bn-after": ("seed 001/003: BN on the input and after each ReLU (271,346 params)",
                             {**_FASHION, "activation": "relu", "bn": "after", "input_bn": True}),
    "fashion-mlp-bn-before": ("seed 001: BN on the input and before each ReLU, bias dropped (270,946 params)",
                              {**_FASHION, "activation": "relu", "bn": "before", "input_bn": True}),
    "mnist-mlp-bn-elu": ("seed 000 model 1: input BN, Dense(elu, he_normal, no bias) then BN (270,946 params)",
                         {**_FASHION, "activation": "elu", "init": "he_normal", "bn": "after",
                          "input_bn": True, "bias": "off"}),
    "cifar100-cnn": ("seed 002: 5 conv blocks (4x60 filters pooled, 100 final), no BN (413,200 params)",
                     {**_CIFAR}),
    "cifar100-cnn-bn": ("seed 002: the same CNN with BN after each conv, before the activation (415,920 params)",
                        {**_CIFAR, "bn": "before"}),
    "paper-mnist-mlp": ("Ioffe & Szegedy 2015 s4.1: 3x100 sigmoid MLP, N(0, 0.1^2) init, no BN",
                        {**_PAPER}),
    "paper-mnist-mlp-bn": ("its BN twin: BN before each sigmoid, bias dropped",
                           {**_PAPER, "bn": "before"}),
}


def list_model_presets() -> dict[str, str]:
    return {name: desc for name, (desc, _) in MODEL_PRESETS.items()}


def load_model_spec(name_or_path: str | Path, overrides: dict | None = None):
    """A preset name, or a .toml / .json file holding a spec (optionally under a [model] table)."""
    name = str(name_or_path)
    if name in MODEL_PRESETS:
        data = dict(MODEL_PRESETS[name][1])
    else:
        path = Path(name)
        if not path.is_file():
            raise ValueError(f"{name!r} is neither a model preset ({', '.join(MODEL_PRESETS)}) "
                             "nor a .toml/.json spec file")
        text = read_text_file(path, "TOML" if path.suffix == ".toml" else "JSON")
        try:
            data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not valid {path.suffix.lstrip('.').upper() or 'TOML/JSON'}: {e}") from e
        data = data.get("model", data)
    data.update(overrides or {})
    return parse_model_spec(data)
