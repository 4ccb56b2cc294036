"""What pretraining and fine-tuning share: optimizers and schedules, the DeepSpeed config, DeepSpeed's CPU ops,
seeding."""
