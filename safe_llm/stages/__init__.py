"""The stages of a run, in order: sparsity profile, block-by-block pruning (with joint windows), recovery."""
