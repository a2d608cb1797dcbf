"""The session plane: stateful sessions stepped chunk by chunk, for every protocol alike."""
