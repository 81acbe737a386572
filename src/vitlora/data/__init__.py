"""Data pipeline: sources (what) -> decode (pixels) -> transforms (geometry, normalisation) -> cache (once).

``hf`` (hub data sets) and ``webdataset`` (tar shards, streamed instead of cached) load lazily:
their libraries are optional extras.

Each stage is its own module so it can be tested and reasoned about alone;
the training loop only needs the names re-exported here.
"""

from .cache import ImageCache, build_cache, iterate_batches, stream_decoded
from .decode import SkipReport, load_rgb, printable, to_rgb
from .sources import (
    IMAGE_EXTENSIONS,
    DataSource,
    Sample,
    discover,
    expand_image_paths,
    is_image_file,
    stratified_split,
)
from .transforms import (
    Preprocess,
    center_crop,
    normalize,
    random_resized_crop_flip,
    resize_for_eval,
    resize_for_train,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "DataSource",
    "ImageCache",
    "Preprocess",
    "Sample",
    "SkipReport",
    "build_cache",
    "center_crop",
    "discover",
    "expand_image_paths",
    "is_image_file",
    "iterate_batches",
    "load_rgb",
    "normalize",
    "printable",
    "random_resized_crop_flip",
    "resize_for_eval",
    "resize_for_train",
    "stratified_split",
    "stream_decoded",
    "to_rgb",
]
