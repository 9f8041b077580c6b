"""Model files: finding them, and reading GGUF files and Hugging Face directories into tensors."""

from pdserve.engine.loader.checkpoint import Checkpoint, load_checkpoint
from pdserve.engine.loader.model_files import (
    DEFAULT_MODEL_NAME,
    ModelNotFoundError,
    resolve_model_path,
)

__all__ = [
    "DEFAULT_MODEL_NAME",
    "Checkpoint",
    "ModelNotFoundError",
    "load_checkpoint",
    "resolve_model_path",
]
