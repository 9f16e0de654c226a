"""Datasets: registry, low-data subsets (stub; being written)."""
from mvc.registry import Registry

DATASETS = Registry("dataset")
for _n in ["cifar10", "cifar100", "caltech101", "brain_tumor", "fashion_mnist", "imagefolder"]:
    DATASETS.register(_n)(None)


def list_datasets():
    return DATASETS.names()
