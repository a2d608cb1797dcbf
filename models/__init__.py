"""neuroserve: models."""
