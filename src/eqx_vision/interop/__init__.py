"""Weight conversion from other libraries' checkpoints: one package per format.

- `vit_pytorch`: the `state_dict()`s of vit-pytorch 1.26.11 modules.
- `timm`: timm's model names and checkpoints (timm 1.0.31's configurations).

`diff` compares a ported model with its torch reference output by output.
"""

from ._diff import (
    RECIPES as RECIPES,
    Recipe as Recipe,
    Report as Report,
    Row as Row,
    Tap as Tap,
    diff as diff,
)
from .timm import (
    DataConfig as DataConfig,
    TimmConfigError as TimmConfigError,
    from_timm as from_timm,
    pretrained as pretrained,
)
from .vit_pytorch import (
    CheckpointError as CheckpointError,
    StateDict as StateDict,
    from_vit_pytorch as from_vit_pytorch,
)
