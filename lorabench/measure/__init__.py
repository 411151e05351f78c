"""Measurement on a real device (torch): model builders, training loops, probes, bench, torchrun."""
