"""What the audit and the autotuner measure beyond the paired statistics: layer drift, per-layer sensitivity,
activation outliers, and the accuracy budget they are judged by."""
