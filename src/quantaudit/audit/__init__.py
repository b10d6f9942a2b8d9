"""The audit: orchestration, budgets, drift, sensitivity, outliers."""
