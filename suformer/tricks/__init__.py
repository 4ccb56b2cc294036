"""Su Jianlin's fine-tuning tricks, one small module each, plain PyTorch (kexue.fm posts cited per module).

Each takes tensors, parameters or loss closures, never a training loop, so the fine-tuning loop switches them on
from config and the unit tests check each against its definition on its own.
"""
