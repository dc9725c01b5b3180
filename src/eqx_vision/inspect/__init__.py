"""Looking inside a model: attention maps and gradient saliency.

The models return logits only; these functions re-run a model's encoder with the same
parameters and also return what each attention layer attends to. They reuse the model's
own modules (patch embedding, attention projections, blocks), so the maps are those of the
forward pass that produced the logits, in inference mode (no dropout).

```python
import jax, eqx_vision as ev
from eqx_vision.inspect import attention_maps, attention_rollout

model = ev.ViT(image_size=224, patch_size=16, num_classes=1000, dim=384, depth=6,
               heads=6, mlp_dim=1536, key=jax.random.key(0))
maps = attention_maps(model, image)        # (depth, heads, 197, 197)
cls_to_patches = maps[:, :, 0, 1:]         # what the class token reads, per layer and head
rollout = attention_rollout(maps)          # (197, 197), attention flow through all layers
```
"""

from . import _conv_stages, _cross, _flat, _regional, _windowed  # noqa: F401  (registrations)
from ._core import (
    AttentionMap as AttentionMap,
    image_attention as image_attention,
    register as register,
    saliency as saliency,
)
from ._token_maps import (
    attention_maps as attention_maps,
    attention_probabilities as attention_probabilities,
    attention_rollout as attention_rollout,
    transformer_attention_maps as transformer_attention_maps,
)
