"""neuroserve: calibration."""
