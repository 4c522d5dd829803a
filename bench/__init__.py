"""The FlexDiT benchmark harness: `python -m bench` (kernels, model, sample, sanitize, overhead), regression gates."""
