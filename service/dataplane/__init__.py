"""The protocol-independent prediction plane: inputs, runs, calibrated answers, feedback."""
