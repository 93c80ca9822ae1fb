"""Where models are found: the shipped default model and any Hugging Face causal LM directory."""

from __future__ import annotations

from pathlib import Path

from llmos.syscalls.errors import NotFound

DEFAULT_MODEL_NAME = "default"
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "default"


def resolve_model(model: str | None) -> str:
    """Map a model name or path to the absolute path of a model directory; ENOENT if none."""
    if model is None or model == DEFAULT_MODEL_NAME:
        path = DEFAULT_MODEL_DIR
    else:
        path = Path(model).expanduser()
        if not path.is_absolute():
            raise NotFound(f"model {model!r}: give an absolute path to a Hugging Face model directory "
                           f"or '{DEFAULT_MODEL_NAME}'")
    if not (path / "config.json").is_file():
        raise NotFound(f"no model at {model!r}: expected a Hugging Face model directory with config.json")
    return str(path.resolve())
