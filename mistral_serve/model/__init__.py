"""The Mistral/Llama decoder family in plain PyTorch, and how to load it from HF checkpoints."""
