"""MemLens analysis layer: models, cached prompt analyses and memory metrics.

Pure Python on torch and TransformerLens; nothing here imports Dash or builds a figure. The app,
the command line and notebooks all call the same functions.
"""

import os

# MemLens never downloads: models come from the repo, the Hugging Face cache or a local
# directory. Set before transformers or huggingface_hub are imported anywhere below.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from analysis.models import (  # noqa: E402
    DEMO_MODEL,
    LoadedModel,
    ModelSpec,
    ModelUnavailableError,
    available_models,
    load_model,
    resolve_model,
)
from analysis.prompt import PromptAnalysis, analyze, validate_prompt  # noqa: E402

__all__ = [
    "DEMO_MODEL",
    "LoadedModel",
    "ModelSpec",
    "ModelUnavailableError",
    "PromptAnalysis",
    "analyze",
    "available_models",
    "load_model",
    "resolve_model",
    "validate_prompt",
]
