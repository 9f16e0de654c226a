"""Data and formats: the real datasets (one `ImageDataset` class, a registry of on-disk layouts, low-data
subsets), the synthetic-set format (`synthetic`), captioners and the caption cache (`captions`), prompts
(`prompts`) and index pairs (`pairs`).

`list_datasets()` only lists names: importing this package reads nothing from disk and imports
neither torchvision nor PIL (they are imported when an image is opened).
"""

from mvc.data import sources as _sources  # noqa: F401  (registers the datasets)
from mvc.data import tiny_imagenet as _tiny_imagenet  # noqa: F401  (registers tiny_imagenet)
from mvc.data.dataset import (
                              DATASETS,
                              EVAL_SPLITS,
                              ArraySource,
                              FileSource,
                              ImageDataset,
                              build_dataset,
                              describe_eval_split,
                              draw_per_class,
                              list_datasets,
                              load_splits,
                              low_data_subset,
                              register_dataset,
)
from mvc.data.images import load_rgb, to_rgb

__all__ = ["DATASETS", "EVAL_SPLITS", "ArraySource", "FileSource", "ImageDataset", "build_dataset",
           "describe_eval_split", "list_datasets", "load_splits", "low_data_subset", "register_dataset",
           "draw_per_class", "load_rgb", "to_rgb"]
