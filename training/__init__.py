"""memformer.training: crossbatch training of memory layers (grows with the fine-tuning recipe)."""
