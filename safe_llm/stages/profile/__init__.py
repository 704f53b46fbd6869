"""The sparsity profile stage: how the target sparsity is spread over the decoder blocks."""
