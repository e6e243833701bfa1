"""SGLang plugin: ``--speculative-algorithm DFLARE`` on stock ``sglang==0.5.23``.

Installed as the entry point ``dflare = dflare_sgl.sglang_plugin:register`` in the group
``sglang.srt.plugins``; SGLang's ``load_plugins()`` calls :func:`register` in every
process (server, engine, scheduler ranks, detokenizer), so after ``pip install dflare_sgl``

    python -m sglang.launch_server --model-path TARGET \\
        --speculative-algorithm DFLARE --speculative-draft-model-path DRAFT

serves a DFlare draft. Modules: :mod:`.spec` (the algorithm and its server arguments),
:mod:`.models.qwen_dflare` (the draft model on SGLang layers), :mod:`.worker` (the
DFlashWorkerV2 subclass running ``layer_mix_kv`` and ``verify_block``), :mod:`.cpu_compat`
(applied only when SGLang runs on CPU), :mod:`.serve` (``dflare serve``).
"""

from __future__ import annotations

_registered = False


def register() -> None:
    """Register DFLARE, its draft model class and (on CPU only) the CPU compatibility."""
    global _registered
    if _registered:
        return
    _registered = True
    from sglang.srt.models.registry import ModelRegistry
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm
    from sglang.srt.utils import is_cpu

    from dflare_sgl.sglang_plugin import spec

    if is_cpu():
        from dflare_sgl.sglang_plugin import cpu_compat

        cpu_compat.apply()
    ModelRegistry.register("dflare_sgl.sglang_plugin.models", strict=True)
    HookRegistry.register(
        "sglang.srt.speculative.dflash_utils.validate_dflash_request",
        spec.refuse_unsupported_request,
        HookType.AFTER,
    )
    HookRegistry.register(
        "sglang.srt.managers.scheduler_components.internal_state."
        "SchedulerInternalStateController._add_speculative",
        spec.report_verify_lengths,
        HookType.AFTER,
    )

    SpeculativeAlgorithm.register(spec.NAME, supports_overlap=True, spec_class=spec.DFlareSpecAlgo)(
        worker_class
    )


def worker_class(server_args):
    """The worker class: :class:`~.worker.DFlareWorker`, or the subclass named by the env var
    ``DFLARE_SGLANG_WORKER=module:Class`` (a hook for tests and experiments, e.g. a worker
    feeding known drafts; it must subclass DFlareWorker)."""
    import importlib
    import os

    from dflare_sgl.sglang_plugin.worker import DFlareWorker

    override = os.environ.get("DFLARE_SGLANG_WORKER")
    if not override:
        return DFlareWorker
    module, _, name = override.partition(":")
    cls = getattr(importlib.import_module(module), name, None)
    if not (isinstance(cls, type) and issubclass(cls, DFlareWorker)):
        raise TypeError(f"DFLARE_SGLANG_WORKER={override!r} does not name a DFlareWorker subclass")
    return cls
