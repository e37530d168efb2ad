"""Evaluations: passkey, needles (RULER-style variants), perplexity, and their plots."""
