"""Model families (publisher.family): one module per family."""
