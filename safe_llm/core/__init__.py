"""Building blocks every stage shares: the blocks of a model and their prunable matrices, sparsity patterns, calibration statistics, precision, processes, memory and atomic writes."""
