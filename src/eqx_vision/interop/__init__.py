"""Weight conversion from other libraries' checkpoints."""

from ._vit_pytorch import (
    CheckpointError as CheckpointError,
    StateDict as StateDict,
    from_vit_pytorch as from_vit_pytorch,
    register as register,
)
