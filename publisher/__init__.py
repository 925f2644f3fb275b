"""coreml-publisher: Stable Diffusion checkpoints -> Core ML variants -> the Hugging Face Hub."""

__version__ = "0.1.0"
