"""fedsim: federated LoRA fine-tuning under differential privacy, simulated on Ray."""

__version__ = "0.1.0"
