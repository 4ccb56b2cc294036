"""What pretraining and fine-tuning share, typed on values: the DeepSpeed engine (engine.py), optimizers and
learning-rate schedules, the model a run starts from, the efficiency switches (activation checkpointing,
torch.compile), FLOPs and memory accounting, DeepSpeed's CPU ops, seeding."""
