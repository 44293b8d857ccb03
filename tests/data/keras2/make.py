"""Writes the committed Keras 2 (tf.keras) files of the Keras-import tests: mlp.h5, cnn.h5, the inputs
given to them (x_*.npy), what tf.keras's predict returned (p_*.npy) and its parameter counts
(counts.json).

Made with tensorflow-cpu 2.21.0 and tf-keras 2.21.0 in a separate virtual environment (TensorFlow is
not a bnlab dependency, not even for tests):
    python3 -m venv /tmp/tfvenv && /tmp/tfvenv/bin/pip install tensorflow-cpu==2.21.0 tf-keras==2.21.0
    /tmp/tfvenv/bin/python tests/data/keras2/make.py
"""

import json
import sys
from pathlib import Path

import numpy as np
import tf_keras

here = Path(__file__).parent
sys.path.insert(0, str(here.parent.parent))
from keras_files import models  # noqa: E402

tf_keras.utils.set_random_seed(0)
counts = {}
for name, (model, x) in models(tf_keras).items():
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    counts[name] = {"total": model.count_params(), "trainable": trainable,
                    "non_trainable": model.count_params() - trainable}
    model.save(here / f"{name}.h5")  # Keras 2's HDF5 format
    np.save(here / f"x_{name}.npy", x)
    np.save(here / f"p_{name}.npy", model.predict(x, verbose=0))
(here / "counts.json").write_text(json.dumps(counts, indent=1) + "\n")  # Keras's own parameter counts
print("wrote", sorted(p.name for p in here.iterdir()), "with tf_keras", tf_keras.__version__)
