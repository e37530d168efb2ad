"""One process of the two-process DDP / FSDP tests (tests/test_training.py), run by torchrun on CPU.

argv: OUT MODE (ddp | fsdp). Both train 3 steps of the tiny config and write, per rank, the full
adapter (rank{r}.safetensors) and facts (rank{r}.json), then resume a second recipe from the step-2
checkpoint and write its final adapter (resumed{r}.safetensors)."""
import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from test_training import recipe_for, tiny_config  # noqa: E402

from memformer.training import sharding  # noqa: E402

out, mode, rank = Path(sys.argv[1]), sys.argv[2], int(os.environ["RANK"])
fsdp = mode == "fsdp"


def config(run: str, **over):
    return tiny_config(out / f"data{rank}", **{"output_dir": str(out / run), "train.max_steps": 3,
                                               "checkpoint.every": 2, "eval.at_start": False,
                                               "eval.at_end": fsdp, "eval.passkey_trials": 1 if fsdp else 0,
                                               "eval.passkey_lengths": "[300]", "train.threads": 1,
                                               "train.gradient_checkpointing": fsdp, "train.fsdp": fsdp, **over})


r = recipe_for(config("run"))
frozen = {n: sharding.full(p.detach()).clone() for n, p in r.model.named_parameters() if not p.requires_grad}
trainable = [p for p in r.model.parameters() if p.requires_grad]
sharded = all(sharding.is_sharded(p) for p in trainable) and any(
    p.to_local().numel() < p.numel() for p in trainable if sharding.is_sharded(p))
last_eval = r.train()
acc = r.accelerator
save_file(sharding.gather_trainable(r.model), out / f"rank{rank}.safetensors")
facts = {"world": acc.num_processes, "index": acc.process_index, "type": str(acc.distributed_type),
         "sharded": sharded, "eval": last_eval,
         "frozen_unchanged": all(torch.equal(sharding.full(p.detach()), frozen[n])
                                 for n, p in r.model.named_parameters() if n in frozen)}
# a second run resumes from step 2 and must end where the uninterrupted one did
ckpt = sorted((out / "run" / "checkpoints").glob("step_*"))[0]
resumed = recipe_for(config("resumed", **{"checkpoint.resume": str(ckpt), "eval.at_end": False}))
facts["resumed_from"] = resumed.step
resumed.train()
save_file(sharding.gather_trainable(resumed.model), out / f"resumed{rank}.safetensors")
resumed.cleanup()
json.dump(facts, open(out / f"rank{rank}.json", "w"))
r.cleanup()
