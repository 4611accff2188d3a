"""Reading weight files: never run code from one, and say in one line what a file is not.

``torch.load(weights_only=True)`` unpickles only tensors and plain containers; a file that
needs anything else (a pickled class: code would run), a text file, a truncated download or
a folder gets a ``ConfigError`` naming the file and the option it came from, never an
UnpicklingError or a KeyError traceback.

Training checkpoints of other codebases (timm, DINO) also keep their command line as an
``argparse.Namespace`` and metrics as numpy scalars: plain values with no code behind them,
so those few types are allowed too (``DATA_GLOBALS``).
"""

from __future__ import annotations

import argparse
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from audiofx.errors import ConfigError

_multiarray = getattr(np, "_core", None) or np.core  # numpy 2 moved it
DATA_GLOBALS = [argparse.Namespace, _multiarray.multiarray.scalar, np.dtype,
                *(getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType"))]


def load_state_file(path: str | Path, option: str = "--init") -> Any:
    """The contents of a checkpoint file (state dicts and plain values), on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{option} {path}: there is no such file", "pass the path of a checkpoint file")
    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals(DATA_GLOBALS):
            warnings.simplefilter("ignore")  # torch warns about the pickle protocol of files it then refuses
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        globals_ = [line.strip() for line in str(err).splitlines() if "unsupported global" in line.lower()]
        if globals_:  # a class or function to call: code would run
            raise ConfigError(f"{option} {path} holds more than tensors and plain values, so loading it would run "
                              f"code: refused ({globals_[0][:120]})",
                              "pass a state dict saved with torch.save(model.state_dict(), ...)") from None
        raise ConfigError(f"{option} {path} is not a checkpoint torch can read (not a torch.save file)",
                          "pass a file saved with torch.save (a .pt or .pth state dict)") from None
    except (RuntimeError, EOFError, KeyError, ValueError, zipfile.BadZipFile, OSError) as err:
        raise ConfigError(f"{option} {path} is not a checkpoint torch can read ({type(err).__name__}: "
                          f"{str(err).strip().splitlines()[0][:120] if str(err).strip() else 'no detail'})",
                          "pass a file saved with torch.save (a .pt or .pth state dict); it may be truncated") from None
