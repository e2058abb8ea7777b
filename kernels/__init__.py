"""Compute kernels, shipped as `moespac_vllm.kernels` (setup.py maps this folder there).

- `fused_experts`: routed experts over the device slot cache (Triton; torch reference beside it).
- `cpu_experts`: routed experts from host weights on a background thread (`CpuExpertPool`).

Nothing is imported here, so `import moespac_vllm.kernels` stays free of torch/triton start-up cost;
neither module imports vLLM (tests/test_layering.py)."""
