"""Weight conversion from other libraries' checkpoints: one package per format.

- `vit_pytorch`: the `state_dict()`s of vit-pytorch 1.26.11 modules.
"""

from .vit_pytorch import (
    CheckpointError as CheckpointError,
    StateDict as StateDict,
    from_vit_pytorch as from_vit_pytorch,
)
