"""Session state: the store interface, its in-process and Redis implementations, and the codec."""
