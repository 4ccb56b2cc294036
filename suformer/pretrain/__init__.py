"""Pretraining: the driver behind `jobs/pretrain.py` (driver.py), the Ray Train worker running DeepSpeed
(worker.py), its batches, validation and run checkpoints, and the corpus-to-shards data stage (data/)."""
