"""Mixed precision: bfloat16 compute with float32 parameters.

Every layer of `eqx_vision` casts its (float32) parameters to the dtype of its input at
the point of use, so the dtype of the image a model is called on is the dtype its
activations are computed in. A [`Precision`][eqx_vision.precision.Precision] policy
names that dtype and applies it at the two ends of a model call: the image is cast to the
compute dtype on the way in, the logits to float32 on the way out. Nothing else is
needed: the parameters, and therefore their gradients and the optimizer state, stay
float32.

```python
import equinox as eqx, jax, optax
import eqx_vision as ev

policy = ev.Precision("bfloat16")

@eqx.filter_jit
def loss(model, images, labels):
    logits = jax.vmap(model)(policy.cast_input(images))  # bfloat16 inside the model
    logits = policy.cast_output(logits)                   # float32 for the loss
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
```

[`training.train_step`][eqx_vision.training.train_step] and the other functions of
[`eqx_vision.training`](training.md) take the policy as `precision=`.

The policy is a plain, immutable value: there is no global switch and nothing is read
from a context at trace time, so two policies can be used side by side, and one can be
passed to a `jax.jit`-compiled function as a static argument.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import PyTree


__all__ = ["COMPUTE_DTYPES", "Precision", "cast_input", "cast_output"]

COMPUTE_DTYPES: tuple[str, ...] = ("float32", "bfloat16")
"""The names of the compute dtypes a [`Precision`][eqx_vision.precision.Precision] takes."""


def _is_float_array(x: Any) -> bool:
    return isinstance(x, jax.Array | np.ndarray | np.generic) and jnp.issubdtype(
        x.dtype, jnp.floating
    )


def cast_input(tree: PyTree, dtype: Any) -> PyTree:
    """Cast every floating-point array of `tree` to `dtype`.

    Integer, boolean and key arrays (labels, masks, PRNG keys) and non-array leaves are
    left as they are, so a whole batch `(images, labels)` can be passed.

    **Arguments:**

    - `tree`: an array or a PyTree of arrays (e.g. a batch of images).
    - `dtype`: the target dtype, e.g. `jnp.bfloat16` or `"bfloat16"`.

    **Returns:** `tree` with its floating-point arrays cast to `dtype`.
    """
    dtype = jnp.dtype(dtype)
    return jax.tree.map(lambda x: jnp.asarray(x, dtype) if _is_float_array(x) else x, tree)


def cast_output(tree: PyTree) -> PyTree:
    """Cast every floating-point array of `tree` to float32: the logits before a loss,
    a softmax or an `argmax` over the classes."""
    return cast_input(tree, jnp.float32)


@dataclasses.dataclass(frozen=True)
class Precision:
    """A mixed-precision policy: the dtype a model computes in.

    With `compute_dtype="bfloat16"`, a model called through the policy runs as follows.

    - **float32, stored**: the parameters, and so their gradients and the optimizer
      state; the BatchNorm running statistics (`eqx.nn.State`).
    - **bfloat16**: the input image (`cast_input`); every matrix multiply and convolution,
      each layer casting its float32 weights and biases to the activations' dtype at use
      (as it does class tokens, position embeddings, LayerScale, attention biases and
      head-mixing matrices); activations, dropout, the residual stream, attention scores
      and the probabilities-times-values product; the logits the model returns.
    - **float32 inside, bfloat16 out**: LayerNorm and BatchNorm (statistics, normalisation
      and affine map), the attention softmax (and PatchMerger's), mean pooling over tokens
      or pixels (accumulated in float32).
    - **float32**: the logits after `cast_output`, and so the loss, its softmax, `argmax`
      and the accuracy.
    - **Backward pass**: the activations' gradients are bfloat16, computed by the same
      bfloat16 matrix multiplies; each parameter's gradient arrives in float32 through
      the transpose of its cast.

    `compute_dtype="float32"` (the default) computes everything in float32, as a model
    called on a float32 image does; it is the precision of the numerical parity with the
    reference implementation. float16 is not offered: its narrow exponent range would need
    loss scaling, which bfloat16 (float32's exponent range) does not.

    An optimizer thus updates float32 parameters with float32 statistics: no separate
    master copy of the weights is needed. The measured difference between the bfloat16 and
    the float32 logits and gradients of every architecture is in the
    [mixed precision guide](../precision.md).
    """

    compute_dtype: Any = "float32"
    """The dtype of the activations: `"float32"` or `"bfloat16"` (a name, a NumPy dtype or
    `jnp.bfloat16`); stored as its name."""

    def __post_init__(self):
        try:
            name = jnp.dtype(self.compute_dtype).name
        except TypeError:
            name = None
        if name not in COMPUTE_DTYPES:
            shown = " or ".join(repr(c) for c in COMPUTE_DTYPES)
            raise ValueError(f"compute_dtype must be {shown}; got {self.compute_dtype!r}.")
        object.__setattr__(self, "compute_dtype", name)

    @property
    def dtype(self) -> np.dtype:
        """The compute dtype as a NumPy dtype (`jnp.dtype(compute_dtype)`)."""
        return jnp.dtype(self.compute_dtype)

    def cast_input(self, tree: PyTree) -> PyTree:
        """The floating-point arrays of `tree` (e.g. a batch of images) cast to the
        compute dtype; see [`cast_input`][eqx_vision.precision.cast_input]."""
        return cast_input(tree, self.dtype)

    def cast_output(self, tree: PyTree) -> PyTree:
        """The floating-point arrays of `tree` (e.g. the logits) cast to float32; see
        [`cast_output`][eqx_vision.precision.cast_output]."""
        return cast_output(tree)

    @classmethod
    def of(cls, precision: "Precision | str | Any") -> "Precision":
        """`precision` itself if it is a `Precision`, else `Precision(precision)`: how the
        functions of [`eqx_vision.training`](training.md) read their `precision=`."""
        return precision if isinstance(precision, cls) else cls(precision)
