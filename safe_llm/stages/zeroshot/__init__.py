"""Zero-shot accuracy of the dense model before the run and of the result after it."""
