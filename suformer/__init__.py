"""suformer: T5 PEGASUS and RoFormerV2 in PyTorch, and a Ray + DeepSpeed + MLflow platform to train them.

Importing this package (or suformer.models, suformer.attention) pulls in torch only: GPU benchmark machines have
nothing else.
"""
__version__ = "0.1.0"
