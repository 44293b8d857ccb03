"""What a result was produced with: package versions, machine and device."""

from __future__ import annotations

import os
import platform
import sys


def environment(device: str | None = None) -> dict:
    import numpy
    import torch

    import bnlab

    info = {
        "bnlab": bnlab.__version__, "python": sys.version.split()[0], "torch": torch.__version__,
        "numpy": numpy.__version__, "platform": platform.platform(), "machine": platform.machine(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }
    if device:
        info["device"] = device
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    return info
