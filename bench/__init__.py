"""The FlexDiT benchmark harness: `python -m bench` (kernels, model, sample), FLOP accounting, regression gates."""
