"""`memformer train`: crossbatch fine-tuning of the memory layers (memformer.training).

    memformer train --config training/configs/smollm2_cpu.yaml [key=value ...]
    accelerate launch -m memformer.cli train --config training/configs/smollm2_gpu.yaml   # DDP
    torchrun --nproc_per_node 8 -m memformer.cli train --config training/configs/smollm2_gpu.yaml train.fsdp=true
"""
from __future__ import annotations

import sys


def register(sub) -> None:
    p = sub.add_parser("train", help="fine-tune the memory layers (crossbatch / FoT negatives)")
    p.add_argument("--config", required=True, help="a YAML file (training/configs/*.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. train.max_steps=20 crossbatch.d=[[0,2],[100,8]]")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    import yaml
    from memformer.training import CrossbatchRecipe, TrainConfig
    from memformer.training.config import ConfigError
    try:
        cfg = TrainConfig.load(args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as e:
        print(f"memformer train: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        return 0
    recipe = CrossbatchRecipe(cfg)
    recipe.setup()
    try:
        final = recipe.train()
    finally:
        recipe.cleanup()
    print(f"done: {recipe.step} steps; adapter in {recipe.out / 'adapter'}; metrics in {recipe.out / 'metrics.csv'}")
    if final:
        print("final evaluation: " + ", ".join(f"{k}={v:.4g}" for k, v in final.items()))
    return 0
