"""Batch normalisation with the semantics of `torch.nn.BatchNorm2d`, in Equinox state."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, PRNGKeyArray

from ._checks import NonNegative, Positive, checked_arguments
from ._conv import Conv2d, DepthwiseConv2d
from ._init import full


class BatchNorm(eqx.Module):
    """Batch normalisation over the channel axis (axis 0) of one example.

    Called per example under `jax.vmap(..., axis_name="batch")`; in training mode the
    statistics are taken over the whole mapped batch (and over every device of a sharded
    batch) and all spatial positions, as `torch.nn.BatchNorm2d` does in train mode:

    - the output is normalised with the batch mean and the **biased** batch variance;
    - the running statistics are updated with momentum `m` as
      `running = (1 - m) * running + m * stat`, using the **unbiased** variance
      (`n / (n - 1)` times the biased one, `n` the number of values per channel);
    - `num_batches_tracked` counts the updates.

    In inference mode (`eqx.nn.inference_mode`), the running statistics are used and the
    state is returned unchanged. The state holds `(running_mean, running_var,
    num_batches_tracked)`, initialised to `(0, 1, 0)` as in torch.
    """

    weight: Float[Array, " channels"]
    bias: Float[Array, " channels"]
    state_index: eqx.nn.StateIndex[
        tuple[Float[Array, " channels"], Float[Array, " channels"], Int[Array, ""]]
    ]
    inference: bool
    eps: float = eqx.field(static=True)
    momentum: float = eqx.field(static=True)
    axis_name: str = eqx.field(static=True)

    @checked_arguments
    def __init__(
        self,
        channels: Positive,
        *,
        eps: float = 1e-5,
        momentum: float = 0.1,
        axis_name: str = "batch",
        inference: bool = False,
    ):
        """**Arguments:**

        - `channels`: number of channels (the size of axis 0 of the input).
        - `eps`: added to the variance.
        - `momentum`: the weight of the new batch statistics in the running averages.
        - `axis_name`: the `jax.vmap` axis name the batch is mapped over in training.
        - `inference`: whether to use the running statistics; flipped by
          `eqx.nn.inference_mode`.
        """
        self.weight = full((channels,), 1.0)
        self.bias = full((channels,), 0.0)
        self.state_index = eqx.nn.StateIndex(
            (full((channels,), 0.0), full((channels,), 1.0), jnp.asarray(np.int32(0)))
        )
        self.inference = inference
        self.eps = eps
        self.momentum = momentum
        self.axis_name = axis_name

    def __call__(
        self,
        x: Float[Array, " channels *spatial"],
        state: eqx.nn.State,
        *,
        inference: bool | None = None,
    ) -> tuple[Float[Array, " channels *spatial"], eqx.nn.State]:
        """**Arguments:**

        - `x`: one example, channels first.
        - `state`: the model's `eqx.nn.State`.
        - `inference`: overrides the module's own flag for this call.

        **Returns:** the normalised `x` and the updated state.
        """
        inference = self.inference if inference is None else inference
        running_mean, running_var, count = state.get(self.state_index)
        shape = (-1,) + (1,) * (x.ndim - 1)
        dtype = x.dtype
        xf = x.astype(jnp.promote_types(dtype, jnp.float32))
        if inference:
            mean, var = running_mean, running_var
        else:
            axes = tuple(range(1, x.ndim))
            try:
                mean = jax.lax.pmean(jnp.mean(xf, axis=axes), self.axis_name)
                var = jax.lax.pmean(
                    jnp.mean(jnp.square(xf - mean.reshape(shape)), axis=axes), self.axis_name
                )
                batch = jax.lax.psum(1, self.axis_name)
            except NameError as e:
                raise NameError(
                    f"BatchNorm in training mode computes statistics over the batch: map the "
                    f'model with jax.vmap(..., axis_name="{self.axis_name}"), or switch to '
                    f"inference with eqx.nn.inference_mode. ({e})"
                ) from e
            n = batch * (xf.size // xf.shape[0])
            unbiased = var * (n / max(n - 1, 1))
            m = self.momentum
            new = (
                jax.lax.stop_gradient((1 - m) * running_mean + m * mean),
                jax.lax.stop_gradient((1 - m) * running_var + m * unbiased),
                count + 1,
            )
            state = state.set(self.state_index, new)
        y = (xf - mean.reshape(shape)) * jax.lax.rsqrt(var.reshape(shape) + self.eps)
        y = y * self.weight.reshape(shape) + self.bias.reshape(shape)
        return y.astype(dtype), state


class ConvBN(eqx.Module):
    """A convolution followed by `BatchNorm` over its output channels.

    The `Conv2d → BatchNorm2d` pair of the reference's CvT projections (depthwise) and LeViT
    attention (1x1). Called as `y, state = conv_bn(x, state)`.
    """

    conv: Conv2d | DepthwiseConv2d
    bn: BatchNorm

    @checked_arguments
    def __init__(
        self,
        in_channels: Positive,
        out_channels: Positive,
        kernel_size: Positive = 1,
        *,
        stride: Positive = 1,
        padding: NonNegative = 0,
        depthwise: bool = False,
        use_bias: bool = False,
        eps: float = 1e-5,
        momentum: float = 0.1,
        axis_name: str = "batch",
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `in_channels`, `out_channels`: channel counts; a depthwise convolution needs
          `out_channels` to be a multiple of `in_channels`.
        - `kernel_size`, `stride`, `padding`: of the (square) convolution, padding on both
          sides.
        - `depthwise`: a depthwise convolution (`groups = in_channels`) instead of a full one.
        - `use_bias`: whether the convolution has a bias.
        - `eps`, `momentum`, `axis_name`: of the `BatchNorm`.
        - `key`: a `jax.random.key` for the initialisation.
        """
        if depthwise:
            if out_channels % in_channels:
                raise ValueError(
                    f"a depthwise ConvBN needs out_channels to be a multiple of in_channels; "
                    f"got in_channels={in_channels}, out_channels={out_channels}."
                )
            self.conv = DepthwiseConv2d(
                in_channels,
                kernel_size,
                stride=stride,
                padding=padding,
                multiplier=out_channels // in_channels,
                use_bias=use_bias,
                key=key,
            )
        else:
            self.conv = Conv2d(
                in_channels,
                out_channels,
                kernel_size,
                stride=stride,
                padding=padding,
                use_bias=use_bias,
                key=key,
            )
        self.bn = BatchNorm(out_channels, eps=eps, momentum=momentum, axis_name=axis_name)

    def __call__(
        self, x: Float[Array, "in_channels height width"], state: eqx.nn.State
    ) -> tuple[Float[Array, "out_channels out_height out_width"], eqx.nn.State]:
        """**Arguments:**

        - `x`: one feature map, channels first.
        - `state`: the model's `eqx.nn.State`.

        **Returns:** the normalised convolution output and the updated state.
        """
        return self.bn(self.conv(x), state)
