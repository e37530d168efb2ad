"""One process of the two-process DDP test (tests/test_training.py), run by torchrun on CPU."""
import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from test_training import recipe_for, tiny_config  # noqa: E402

out, rank = Path(sys.argv[1]), int(os.environ["RANK"])
cfg = tiny_config(out / f"data{rank}", **{"output_dir": str(out / "run"), "train.max_steps": 3,
                                           "checkpoint.every": 0, "eval.at_start": False, "eval.at_end": False,
                                           "train.threads": 1, "train.gradient_checkpointing": False})
r = recipe_for(cfg)
frozen = {n: p.detach().clone() for n, p in r.model.named_parameters() if not p.requires_grad}
r.train()
acc = r.accelerator
save_file({n: t.contiguous() for n, t in r.model.trainable_state_dict().items()}, out / f"rank{rank}.safetensors")
json.dump({"world": acc.num_processes, "index": acc.process_index, "type": str(acc.distributed_type),
           "frozen_unchanged": all(torch.equal(p, frozen[n]) for n, p in r.model.named_parameters() if n in frozen)},
          open(out / f"rank{rank}.json", "w"))
r.cleanup()
