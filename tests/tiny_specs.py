"""The tiny experiment specs several test files run (a few seconds on synthetic data)."""

# an experiment as TOML text: one variant, one seed, one epoch
TINY_TOML = '''name = "tiny"
seeds = 1
[data]
dataset = "synthetic"
options = { n_train = 60, n_test = 20, features = 4 }
[train]
epochs = 1
[variants.a]
model = { kind = "mlp", hidden = [8], bn = "before" }
'''

# an experiment as a dict, for parse_experiment / run_experiment
TINY = {"name": "tiny", "seeds": 1,
        "data": {"dataset": "synthetic", "validation": 0.25,
                 "options": {"n_train": 60, "n_test": 20, "features": 4, "classes": 2}},
        "model": {"kind": "mlp", "input_shape": [4], "num_classes": 2, "hidden": [4], "bn": "before"},
        "train": {"lr": 0.05, "epochs": 1, "batch_size": 16},
        "variants": {"bn": {}}}
