"""Perplexity of the dense model before the run's other stages and of the result after them."""
