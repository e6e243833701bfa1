"""DFLARE in a real SGLang Engine with a TRAINED draft: real acceptance, exact output.

A short training run of the project's trainer (``dflare_sgl.training``) on the greedy outputs
of a tiny Llama target (the one test_training_run.py learns on: its continuation is a
learnable pattern) gives a draft that SGLang accepts from; the engine's greedy output with
DFLARE must equal the target's alone, token for token (float32).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sglang_support import engine_kwargs, run_engine
from test_training_run import _gen_config, _tiny_target, _train_config

from dflare_sgl.training.data import load_sequences
from dflare_sgl.training.generate import generate_data
from dflare_sgl.training.trainer import train

GREEDY = {"temperature": 0, "max_new_tokens": 24}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, smollm2_dir):
    """(tiny target folder, trained block-4 DFlare draft folder, the training prompts)."""
    root = tmp_path_factory.mktemp("sglang_trained")
    target = _tiny_target(root / "target", smollm2_dir)
    # The data and training settings test_training_run.py shows to learn this target.
    data = generate_data(_gen_config(str(target), root / "data"))
    draft = train(_train_config(str(target), str(data), root / "draft", steps=20, anchors=16))
    prompts = [s.prompt().tolist() for s in load_sequences(Path(data))]
    return target, draft, prompts


def test_trained_draft_is_accepted_and_lossless(trained, tmp_path):
    target, draft, prompts = trained
    jobs = [{"kind": "generate", "input_ids": prompts, "sampling_params": GREEDY}]
    # Every step verifies the whole block (fixed), so the accept length measures the draft.
    tiny = {"max_total_tokens": 4096, "context_length": 1024, "speculative_num_draft_tokens": 4}
    reference = run_engine(tmp_path, "tiny_reference", engine_kwargs(target, **tiny), jobs)
    dflare = run_engine(tmp_path, "tiny_dflare", engine_kwargs(target, draft, **tiny), jobs)
    assert [o["output_ids"] for o in dflare[0]] == [o["output_ids"] for o in reference[0]]
    accept = [o["meta"]["spec_accept_length"] for o in dflare[0]]
    # An untrained draft commits ~1 token per verify step; the trained one more.
    assert np.mean(accept) > 2.5, accept
