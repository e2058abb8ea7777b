"""vLLM glue: the only code in moespac-vllm that imports `vllm`.

Ledger of every place we touch vLLM (why, how, upstream status, when it can go) lives in
`LEDGER` below; each entry's module wraps the original and fails loudly if the upstream
signature changed.
"""
from __future__ import annotations

# (module, what it touches, why, sanctioned?, removable when)
LEDGER: tuple[tuple[str, str, str, str, str], ...] = (
    (
        "plugin.py:_install_plugin_flag",
        "vllm.engine.arg_utils.EngineArgs.add_cli_args (wrapped; adds `--plugin {moespac}`)",
        "the design card's spelling `vllm serve MODEL --plugin moespac`; vLLM 0.32/0.33 has no "
        "--plugin flag",
        "sanctioned hook: AsyncEngineArgs.add_cli_args loads general plugins first 'so plugins "
        "can update the parser'; not upstream",
        "when vLLM grows a --plugin flag, or when the spelling is dropped from the docs",
    ),
    (
        "routed_experts.py:OffloadedRoutedExperts",
        "vllm RoutedExperts (PluggableLayer.register_oot 'RoutedExperts'; subclass: host-memory "
        "weights, forward_modular runs the offloaded layer; draft_model.* layers stay stock)",
        "the offloaded MoE layer: every expert in host memory, device slots, CPU experts",
        "sanctioned: vLLM's out-of-tree layer registry; not upstream (cf. vllm PR #37190's "
        "expert weight provider)",
        "when vLLM ships an expert-offloading hook that takes a placement plan per forward",
    ),
    (
        "routed_experts.py:StockCpuExpertsKernel / _HostWeightsMethod",
        "vllm UnquantizedFusedMoEMethod.process_weights_after_loading (called unchanged on CPU-only "
        "engines; its modular kernel is kept aside and `moe_kernel` reset to None) and "
        "CPUUnquantizedExperts.apply (called with remapped rows; parameter names checked)",
        "greedy outputs bit-identical to stock in bf16: the offloaded layer computes with the very "
        "experts object, packing and op stock would use",
        "not sanctioned (apply is a kernel-internal API); wraps, never edits",
        "when vLLM's experts accept an expert-weight provider (vllm PR #37190's direction)",
    ),
    (
        "spec_hook.py:install",
        "vllm.v1.worker.gpu_model_runner.GPUModelRunner.execute_model / propose_draft_token_ids "
        "/ sample_tokens (wrapped; originals called unchanged; signatures checked at install)",
        "per-step StepContext from the public SchedulerOutput; end_step(accepted) before the "
        "drafter runs so prefetch overlaps the draft phase",
        "not sanctioned (no step hook in vLLM 0.32/0.33); wraps, never edits",
        "when vLLM exposes a per-step callback for plugins (scheduler output + accepted counts)",
    ),
)
