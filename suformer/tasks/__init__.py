"""Fine-tuning tasks: benchmark readers, heads, losses and metrics."""
