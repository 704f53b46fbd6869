"""The sequential block engine: calibration inputs through each block, a method's prune_block, the block's outputs on to the next."""
