"""PyTorch/diffusers -> Core ML: component wrappers, attention implementations, trace + convert."""
