"""Fine-tuning: the loop behind `jobs/finetune.py` (loop.py), the Ray Tune sweep behind `jobs/sweep.py`
(sweep.py), the tasks it fine-tunes on (tasks/) and the tricks it can switch on (tricks/)."""
