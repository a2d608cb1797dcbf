"""neuroserve: service."""
