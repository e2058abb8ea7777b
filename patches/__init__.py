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
        "plugin.py:_EnablePlugin",
        "the `--plugin moespac` action sets MOESPAC_ENABLE=1 in the environment",
        "opt-in: the flag must reach the engine being configured and the engine processes it "
        "starts, which inherit the environment (argparse drops unknown EngineArgs fields)",
        "plain argparse action on our own flag",
        "with the --plugin flag",
    ),
    (
        "engine_config.py:install",
        "vllm.engine.arg_utils.EngineArgs.create_engine_config (wrapped; original called "
        "unchanged, then the finished VllmConfig is read and, for an enabled MoE engine, "
        "compilation_config.cudagraph_mode set to NONE with capture sizes cleared)",
        "the one place every engine's config is built (LLM, vllm serve, AsyncLLM) and the only one "
        "where a plugin sees additional_config before engine processes start: opt-in decision, "
        "start-up checks (profile, stats_file, record_trace), the `not enabled` line. CUDA "
        "graphs: vLLM's O2 default FULL_AND_PIECEWISE would replay one expert placement; "
        "PIECEWISE split at vllm::moe_forward* would feed the next graph a stale pointer (the "
        "op's and shared experts' outputs are fresh allocations, graphs read capture-time "
        "addresses), so NONE with torch.compile kept is the fastest mode correct for every MoE "
        "model; done as vLLM's own fallback to NONE (_normalize_piecewise_cudagraph_mode)",
        "not sanctioned: vLLM has no config hook for general plugins (platform "
        "check_and_update_config belongs to platform plugins; MODELS_CONFIG_MAP is per "
        "architecture and runs before the optimisation-level defaults exist); wraps, never edits",
        "when vLLM gives general plugins a config hook, or when the offloaded op writes "
        "persistent per-batch-size buffers (then PIECEWISE with vllm::moe_forward split: GPU check)",
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
        "V1 vllm.v1.worker.gpu_model_runner.GPUModelRunner.execute_model / "
        "propose_draft_token_ids / sample_tokens and V2 vllm.v1.worker.gpu.model_runner."
        "GPUModelRunner.execute_model / sample_tokens (wrapped on the classes; originals called "
        "unchanged; signatures checked at install); V2 `runner.speculator.propose` wrapped on "
        "the runner's own speculator instance (BaseSpeculator.propose signature checked); "
        "`get_output` wrapped on the AsyncModelRunnerOutput object sample_tokens returned",
        "per-step StepContext from the public SchedulerOutput; the step closes before the "
        "drafter of any method runs so prefetch overlaps the draft phase; accepted counts read "
        "where vLLM already copied the sampled ids to the host (no extra host sync)",
        "not sanctioned (no step hook in vLLM 0.32/0.33); wraps, never edits",
        "when vLLM exposes a per-step callback for plugins (scheduler output + accepted counts)",
    ),
    (
        "draft_length.py:DraftLengthSeam.propose (called from spec_hook's V1 "
        "propose_draft_token_ids wrapper)",
        "the original is called with a shallow copy of the SchedulerOutput whose "
        "num_spec_tokens_to_schedule is the governor's k (vLLM's Dynamic SD field, read by "
        "propose_draft_token_ids and handed to every proposer; checked at install); vLLM's object "
        "is not changed; at k = 0 the stateless n-gram drafter is not called",
        "draft_length: adaptive: the draft length chosen per step (governor.py) with the draft "
        "loop stopped early, not only trimmed; only under synchronous scheduling (async "
        "scheduling reserves vLLM's k placeholders before the drafter runs: vLLM's k is kept)",
        "not sanctioned: Dynamic SD is meant to be set by the scheduler "
        "(num_speculative_tokens_per_batch_size); no per-step hook for plugins",
        "when vLLM lets a plugin choose num_spec_tokens_to_schedule per step (a scheduler hook "
        "with the runner's feedback)",
    ),
    (
        "engine_errors.py:install",
        "vllm.v1.engine.core.EngineCore.log_error_detail / step / step_with_batch_queue (wrapped "
        "on the class; originals called unchanged; signatures checked at install)",
        "vLLM treats any exception out of execute_model as fatal (the engine core dies); an "
        "offloaded layer's CPU expert failure belongs to one step, so exactly that batch's "
        "requests finish with vLLM's own RequestStatus.FINISHED_ERROR (HTTP 500, as for a "
        "failed KV load) and the engine serves on; every other exception is re-raised untouched",
        "not sanctioned (no per-request error hook for model execution in vLLM 0.32/0.33); "
        "wraps, never edits",
        "when vLLM fails a batch's requests instead of the engine on a model-execution error",
    ),
    (
        "serve.py:ensure_prometheus_multiproc_dir + moespac_vllm/metrics.py",
        "PROMETHEUS_MULTIPROC_DIR (set by `moespac serve` before vLLM / prometheus_client is "
        "imported, unless the user set it); the engine process's moespac_* series are written "
        "there and vLLM's /metrics (get_prometheus_registry: a MultiProcessCollector over the "
        "directory) serves them; nothing of vLLM's is wrapped",
        "the statistics live in the engine-core / worker process, /metrics is served by the API "
        "process. vLLM 0.32/0.33's stat-logger plugins (vllm.stat_logger_plugins) run in the API "
        "process and only see SchedulerStats/IterationStats, which carry no worker-side payload, "
        "so they cannot see the offloaded layer's numbers",
        "sanctioned: vLLM's own multiprocess-metrics mechanism (it sets the same variable for "
        "--api-server-count > 1, vllm/v1/metrics/prometheus.py); not upstream",
        "when worker-side stats can ride SchedulerStats to vLLM's stat loggers",
    ),
)
