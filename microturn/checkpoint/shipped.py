"""The shipped interaction model: the default checkpoint plus the LoRA adapter trained by
`microturn train` (package data, `microturn/models/`), merged at load time.

`--adapter` on the commands picks it: `default` (the shipped adapter, for the default
checkpoint), `none` (the base model as it is), or a path to any adapter file.
"""

from pathlib import Path

from microturn.checkpoint.adapter import apply_adapter
from microturn.checkpoint.loader import LoadedModel, load_model
from microturn.errors import MicroturnError

SHIPPED_ADAPTER = Path(__file__).parent.parent / "models" / "interaction-smollm2-135m.safetensors"


def resolve_adapter(model: str | Path | None, adapter: str | None) -> Path | None:
    """The adapter file `--adapter` names for `--model` (None: serve the base weights)."""
    if adapter in (None, "default"):
        # the shipped adapter was trained on the default checkpoint only
        return SHIPPED_ADAPTER if model is None and SHIPPED_ADAPTER.is_file() else None
    if adapter == "none":
        return None
    path = Path(adapter)
    if not path.is_file():
        raise MicroturnError(f"--adapter: {adapter} is not a file (or say 'none', 'default')")
    return path


def load_interaction_model(model: str | Path | None = None, adapter: str | None = "default",
                           dtype: str = "bf16", device: str | None = "cpu") -> LoadedModel:
    """`load_model`, then the adapter merged into its weights (the engine serves them as
    they are, bitwise what the trainer's forward ran)."""
    loaded = load_model(model, dtype, device)
    path = resolve_adapter(model, adapter)
    if path is not None:
        apply_adapter(loaded, path)
    return loaded
