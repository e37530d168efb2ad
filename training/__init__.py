"""memformer.training: crossbatch (Focused Transformer) fine-tuning of the memory layers.

    from memformer.training import CrossbatchRecipe, TrainConfig
    recipe = CrossbatchRecipe(TrainConfig.load("training/configs/smollm2_cpu.yaml", ["train.max_steps=20"]))
    recipe.setup(); recipe.train(); recipe.cleanup()

Modules: `crossbatch` (dense/top-k crossbatch memory, one episode of windows), `data` (sources,
held-out split, packing, synthetic retrieval), `config` (YAML + overrides), `evaluation`
(held-out loss with/without memory, passkey), `recipe` (setup/train/checkpoints), `metrics`.
"""
from memformer.training.config import ConfigError, Schedule, TrainConfig
from memformer.training.crossbatch import DenseMemory, WindowLM, negative_groups, run_episode
from memformer.training.recipe import CrossbatchRecipe

__all__ = ["CrossbatchRecipe", "TrainConfig", "ConfigError", "Schedule", "DenseMemory", "WindowLM",
           "negative_groups", "run_episode"]
