"""End-to-end recovery after the block loop: distillation against the dense model, masks frozen."""
