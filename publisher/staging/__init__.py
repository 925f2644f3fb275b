"""The staging Hub: a Hub-protocol server that the unmodified huggingface_hub client publishes to."""
