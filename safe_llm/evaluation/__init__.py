"""Perplexity (the papers' protocol), zero-shot accuracy, the result cache and the comparison report."""
