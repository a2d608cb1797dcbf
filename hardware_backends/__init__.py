"""neuroserve: hardware_backends."""
