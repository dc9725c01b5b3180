"""Input pipelines for training and evaluation.

- **In memory** (`eqx_vision.data._memory`): the embedded digits, `.npz` files and small
  image folders, read whole into float32 arrays ([`load_dataset`][eqx_vision.data.load_dataset],
  [`prepare`][eqx_vision.data.prepare] to a [`Dataset`][eqx_vision.data.Dataset]).
- **Streaming** (`eqx_vision.data._stream`): image folders of any size, of which only the
  file list is held ([`scan_folder`][eqx_vision.data.scan_folder]); images are decoded,
  augmented (random resized crop, flip, optionally
  [`RandAugment`][eqx_vision.data.RandAugment]) and batched in grain's worker processes
  ([`StreamingData`][eqx_vision.data.StreamingData]) and cross to the device as uint8.

Both give [`training.fit`][eqx_vision.training.fit] the same thing: `train_batches(epoch,
batch_size, seed=..., start=...)` and `test_batches(batch_size)`.
"""

from ._memory import (
    DIGITS as DIGITS,
    MAX_CLASSES as MAX_CLASSES,
    DataError as DataError,
    Dataset as Dataset,
    ImageFolder as ImageFolder,
    RawDataset as RawDataset,
    TrainingData as TrainingData,
    epoch_order as epoch_order,
    imagenet_classes as imagenet_classes,
    imagenet_folder_files as imagenet_folder_files,
    load_dataset as load_dataset,
    load_digits as load_digits,
    load_folder as load_folder,
    load_image as load_image,
    load_npz as load_npz,
    load_pretrained_image as load_pretrained_image,
    padded_batches as padded_batches,
    prepare as prepare,
    prepare_images as prepare_images,
    process_rows as process_rows,
    resize_center_crop as resize_center_crop,
    scan_folder as scan_folder,
    stratified_split as stratified_split,
)
from ._stream import (
    RAND_AUGMENT_OPS as RAND_AUGMENT_OPS,
    RAND_AUGMENT_ORIGINAL_OPS as RAND_AUGMENT_ORIGINAL_OPS,
    Augment as Augment,
    EvalTransform as EvalTransform,
    RandAugment as RandAugment,
    RandAugmentDraw as RandAugmentDraw,
    StreamingData as StreamingData,
    TrainTransform as TrainTransform,
    hflip as hflip,
    rand_augment_op as rand_augment_op,
    random_resized_crop_box as random_resized_crop_box,
)
