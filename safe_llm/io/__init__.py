"""Everything read or written: models, text, the work area of a run, checkpoints, streaming, export, the Hub, the model card."""
