"""The torch-free estimator: parameter counts, memory per phase, step time, sharding, fit, cost."""
