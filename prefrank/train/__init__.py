"""Reference trainer: tiny offline VLM, synthetic data, preference generation, training loop."""
