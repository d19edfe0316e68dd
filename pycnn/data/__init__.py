"""Data: datasets (CIFAR-10 and friends), the batching loader, augmentation, pre-processing.

    from pycnn.data import augment, datasets, preprocess
    from pycnn.data import ArrayDataset, BalancedSampler, DataLoader
"""
from pycnn.data.loader import ArrayDataset, BalancedSampler, DataLoader

__all__ = ["ArrayDataset", "BalancedSampler", "DataLoader"]
