"""Offline model builders for the demo, the tests and the benchmarks; no part of the paper's system.

    tiny   `make_tiny_model(dir, arch, draft)`: seeded random-weight tiny HF checkpoints + tokenizer
    train  `train_tiny(out, TrainConfig)`: a small trained Qwen3-MoE target and its drafts

The core library (`moespac_vllm.*` outside this package) never imports from here
(tests/test_layering.py); the CLI, the tests and the benchmarks do. Importing this package loads
nothing: torch and transformers come with the submodules.
"""
