"""Sub-commands of the `memformer` CLI, one module each (`register(subparsers)` + a run function).

`memformer.cli` builds the parser from `COMMANDS` (top level) and `EVALS` (under `memformer eval`),
so adding a command is adding a module and a name here.
"""
COMMANDS = ["qa", "memory", "train"]
EVALS = ["eval_passkey", "eval_needle", "eval_ruler", "eval_ppl"]
