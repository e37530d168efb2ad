"""Fine-tune the memory layers of the default backbone from Python, then use the adapter.

    python examples/finetune.py                 # a 20-step taste of training/configs/smollm2_cpu.yaml
    python examples/finetune.py train.max_steps=300 output_dir=runs/full
"""
import sys

from memformer import MemformerForCausalLM
from memformer.training import CrossbatchRecipe, TrainConfig

overrides = ["train.max_steps=20", "output_dir=runs/finetune_example", "eval.every=0", *sys.argv[1:]]
cfg = TrainConfig.load("training/configs/smollm2_cpu.yaml", overrides)
recipe = CrossbatchRecipe(cfg)
recipe.setup()
print(recipe.train())                 # the final evaluation: held-out loss with/without memory, passkey
recipe.cleanup()

model = MemformerForCausalLM.from_pretrained(cfg.model.backbone, adapter=f"{cfg.output_dir}/adapter")
model.memorize("The pass key is 73914. Remember it. " + "The grass is green. " * 400)
print(model.ask("What is the pass key?"))
