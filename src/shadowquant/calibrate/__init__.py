"""Calibration: activation profiling and statistics, sensitivity, the runtime's scales, the weight range."""
