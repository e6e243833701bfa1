"""``--speculative-algorithm DFLARE``: the algorithm SGLang's scheduler sees.

DFLARE runs on SGLang's DFlash machinery (block drafting from captured target hidden
states, a draft KV pool sharing the target's allocator, TARGET_VERIFY), so the spec class
answers the scheduler's predicates as DFLASH does; only the worker and the draft model
differ. Server arguments are resolved from the draft checkpoint's config.json: the block
size (``--speculative-num-draft-tokens`` overrides it), and the mask token and captured
target layers are read by the worker from the same config.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from sglang.srt.speculative.spec_registry import CustomSpecAlgo

from dflare_sgl.draft_model import ARCHITECTURES, DFlareDraftModel, DraftConfig

NAME = "DFLARE"
# DFLASH's default: every running request reserves a verify block of KV per step.
DEFAULT_MAX_RUNNING_REQUESTS = 48


def _read_config(path: str, what: str, revision: str | None) -> dict[str, Any]:
    """config.json of a local folder or a hub id, as SGLang resolves its model paths (the
    hub's cache first, offline mode and HF_ENDPOINT honoured)."""
    from transformers import PretrainedConfig

    try:
        config, _ = PretrainedConfig.get_config_dict(path, revision=revision)
    except OSError as e:
        raise ValueError(
            f"DFLARE cannot read the config.json of {what} {path!r} (a local folder or a hub "
            f"id): {e}"
        ) from e
    return config


def read_draft_config(draft_path: str, revision: str | None = None) -> DraftConfig:
    """The DFlare or DFly draft config at ``draft_path`` (folder or hub id); a DFlash
    checkpoint is refused with a pointer to ``--speculative-algorithm DFLASH``."""
    raw = _read_config(draft_path, "--speculative-draft-model-path", revision)
    archs = raw.get("architectures") or []
    if ARCHITECTURES.get(archs[0] if archs else None) == "shared":
        raise ValueError(
            f"{draft_path} is a DFlash draft ({archs[0]}, one shared fc fusion): serve it with "
            "--speculative-algorithm DFLASH; DFLARE runs QwenDFlareDraftModel and "
            "Qwen3DFlyModel drafts"
        )
    return DraftConfig.from_dict(raw)


def check_draft_for_target(draft: DraftConfig, server_args) -> None:
    """Refuse a draft whose hidden size, captured layers or mask id do not fit the target,
    whose config is read by SGLang's own loader (folder or hub id, ``--revision``,
    ``--trust-remote-code`` and ``--json-model-override-args`` honoured)."""
    from sglang.srt.utils.hf_transformers_utils import get_config

    target_config = get_config(
        server_args.model_path,
        trust_remote_code=server_args.trust_remote_code,
        revision=server_args.revision,
        model_override_args=json.loads(server_args.json_model_override_args or "{}"),
    )
    with torch.device("meta"):
        DFlareDraftModel(draft).check_compatible(target_config)


def resolve_block_size(draft: DraftConfig, requested: int | None) -> int:
    """``--speculative-num-draft-tokens`` if given, else the draft's ``block_size``.

    A block drafts ``B - 1`` tokens at block positions 1 .. B-1; the draft was trained for
    positions up to its own ``block_size - 1``, so a larger block asks it for positions it
    never learned, and ``B < 2`` drafts nothing.
    """
    block = draft.block_size if requested is None else int(requested)
    if not 2 <= block <= draft.block_size:
        raise ValueError(
            f"--speculative-num-draft-tokens {block} does not fit this draft: DFLARE needs a "
            f"block size in [2, {draft.block_size}] (the draft's block_size); omit the flag "
            "to use the draft's own"
        )
    return block


class DFlareSpecAlgo(CustomSpecAlgo):
    """DFLARE as SGLang's scheduler sees it: a member of the DFlash family.

    The ``is_dflash*`` predicates route hidden-state capture, draft KV pool sizing and
    TARGET_VERIFY through the DFlash code paths; the rest mirror DFLASH's answers.
    """

    def is_dflash(self) -> bool:
        return True

    def is_dflash_family(self) -> bool:
        return True

    def supports_target_verify_for_draft(self) -> bool:
        return True

    def supports_prefill_shared_read_done(self) -> bool:
        return True

    def supports_mixed_chunk(self) -> bool:
        return True

    def supports_grammar_overlap(self) -> bool:
        return True

    def carries_draft_hidden_states(self) -> bool:
        return False

    def need_topk(self) -> bool:
        return False

    def create_future_map(
        self,
        device: torch.device,
        req_to_token_pool,
        needs_cpu_seq_lens: bool = True,
        needs_confidence_relay: bool = False,
    ):
        from sglang.srt.managers.overlap_utils import FutureMap

        return FutureMap(
            device, self, req_to_token_pool, needs_cpu_seq_lens, needs_confidence_relay
        )

    def handle_server_args(self, server_args) -> None:
        """Resolve DFLARE's settings on SGLang's server-args recorder (plain attribute
        writes), refusing what cannot work; on GPUs the rest is SGLang's DFLASH handling."""
        if server_args.speculative_draft_model_path is None:
            raise ValueError(
                "DFLARE needs a draft: pass --speculative-draft-model-path "
                "(a QwenDFlareDraftModel or Qwen3DFlyModel checkpoint folder)"
            )
        if server_args.speculative_draft_window_size is not None:
            raise ValueError(
                "DFLARE does not support --speculative-draft-window-size (the compact draft "
                "cache): drop the flag"
            )
        if server_args.pp_size != 1:
            raise ValueError("DFLARE supports pipeline parallel size 1 only: drop --pp-size")
        draft = read_draft_config(
            server_args.speculative_draft_model_path,
            server_args.speculative_draft_model_revision,
        )
        check_draft_for_target(draft, server_args)
        server_args.speculative_num_draft_tokens = resolve_block_size(
            draft, server_args.speculative_num_draft_tokens
        )
        server_args.speculative_num_steps = 1
        server_args.speculative_eagle_topk = 1
        if server_args.max_running_requests is None:
            server_args.max_running_requests = DEFAULT_MAX_RUNNING_REQUESTS
        if server_args.device != "cpu":
            # Everything else exactly as DFLASH resolves it: the platform check, the
            # dp-attention requirements, the draft attention backend (the platform's supported
            # list, its fallback, trtllm_mha moved off for bidirectional drafts). The settings
            # above are already decided, so it keeps them. (It refuses device "cpu", where
            # cpu_compat's CPU settings apply instead.)
            # SGLang's other checks keyed on the name "DFLASH" (0.5.23) either refuse DFLARE
            # with their own message (unified memory, LoRA, CP/TP group sharing, block
            # verification), concern model families DFLARE does not draft for (KDA linear
            # attention, Muse Spark, MiniMax-M3, Nemotron-H), or guard DFLASH's draft-KV
            # writer (SM100 NVFP4): DFLARE writes its pool itself and refuses quantized
            # layouts at start-up (worker._draft_kv_caches, run by the pre-warm).
            from sglang.srt.arg_groups.speculative_hook import _handle_dflash

            _handle_dflash(server_args)
        else:
            from dflare_sgl.sglang_plugin import cpu_compat

            cpu_compat.adjust_server_args(server_args)


def refuse_unsupported_request(error: str | None, req, enable_overlap: bool) -> str | None:
    """AFTER hook on the scheduler's ``validate_dflash_request``: DFLARE verifies
    temperature / top-k / top-p exactly but has no min_p filter, so such a request is
    aborted with this message rather than sampled from a different distribution."""
    from sglang.srt.runtime_context import get_spec

    if error is None and get_spec().speculative_algorithm == NAME and req.sampling_params.min_p > 0:
        return "DFLARE does not support min_p sampling: drop min_p from the request"
    return error


def report_verify_lengths(result, controller, state: dict) -> None:
    """AFTER hook on the scheduler's ``/server_info`` speculative section (which returns
    nothing): DFLARE adds ``dflare_verify_lengths``, the verify lengths its decode steps chose,
    their measured costs and the acceptance by draft position
    (:meth:`.adaptive_length.ServerVerifyLength.report`)."""
    worker = getattr(controller.scheduler, "draft_worker", None)
    lengths = getattr(worker, "verify_lengths", None)
    if lengths is not None:
        state["dflare_verify_lengths"] = lengths.report()
