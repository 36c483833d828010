"""3x3 convolutions by Winograd's minimal filtering, F(2x2, 3x3), as plain JAX operations.

A 3x3, stride-1 convolution computes each 2x2 block of outputs from a 4x4 tile of inputs.
Winograd's algorithm (Lavin and Gray, "Fast Algorithms for Convolutional Neural Networks",
CVPR 2016) does it with 16 products per input/output channel pair instead of 36::

    Y = A^T [ (G g G^T) * (B^T d B) ] A

where ``d`` is the 4x4 input tile, ``g`` the 3x3 kernel, ``*`` the elementwise product summed
over input channels, i.e. 16 independent ``(tiles, C_in) @ (C_in, C_out)`` matrix products.
The transforms ``B``, ``G``, ``A`` have entries 0, +-1 and +-1/2: they are additions, which
XLA fuses with the tile extraction. So the matmul work of the convolution falls 2.25 times;
every operation is linear in the input and in the kernel, so the first and second derivatives
(the trajectory-matching hypergradient) are again additions and the same 16 products.

This is satm-jax's CPU convolution for 3x3 layers with enough input channels (``conv_impl=
"winograd"``, ``"auto"`` on the CPU; ``satm_jax.models``): measured against the
patches-then-matmul form in docs/PERFORMANCE.md. The larger F(4x4, 3x3) (4x fewer products)
was measured slower on the CPU (its 36 transform terms with non-unit coefficients cost more
than the products saved) and is not offered. Rounding: against a float64 reference the
float32 error stays within a few times the direct convolution's (tested; on random data it was
smaller, 6.9e-7 against 9.1e-7).

Example:
  >>> import jax, jax.numpy as jnp
  >>> from satm_jax import winograd
  >>> x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 4))
  >>> k = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 4, 5))
  >>> y = winograd.conv3x3(x, k, padding=1)
  >>> ref = jax.lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)),
  ...                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))
  >>> y.shape, bool(jnp.allclose(y, ref, atol=1e-4))
  ((2, 8, 8, 5), True)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# F(2x2, 3x3) (Lavin and Gray 2016, section 4.1).
B_T = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float64)
G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], np.float64)
A_T = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float64)


def _combine(matrix: np.ndarray, parts: list[Array]) -> list[Array]:
    """``[sum_j matrix[i, j] * parts[j] for i]``, skipping zeros and writing +-1 as +-."""
    out = []
    for row in matrix:
        acc = None
        for c, p in zip(row, parts):
            if c == 0:
                continue
            term = p if c == 1 else (-p if c == -1 else float(c) * p)
            acc = term if acc is None else acc + term
        out.append(acc)
    return out


def transform_kernel(kernel: Array) -> Array:
    """``G g G^T`` for every channel pair: ``(3, 3, C_in, C_out)`` -> ``(16, C_in, C_out)``.

    Written as additions of the kernel's nine slices (an einsum with ``G`` lowers to matmuls
    with an inner dimension of 3, which XLA's CPU backend runs slowly).
    """
    rows = _combine(G, [kernel[i] for i in range(3)])  # 4 x (3, C_in, C_out)
    return jnp.stack([t for r in rows for t in _combine(G, [r[j] for j in range(3)])], 0)


def conv3x3(x: Array, kernel: Array, *, padding: int) -> Array:
    """3x3, stride-1 cross-correlation (PyTorch's ``Conv2d``), NHWC input and HWIO kernel.

    Same function as ``jax.lax.conv_general_dilated`` with ``padding`` zeros on every side;
    odd output sizes are handled by one extra row/column of padding, cropped at the end.
    """
    kh, kw, cin, cout = kernel.shape
    if (kh, kw) != (3, 3):
        raise ValueError(f"winograd.conv3x3 needs a 3x3 kernel, got {kh}x{kw}")
    b, h, w, _ = x.shape
    ho, wo = h + 2 * padding - 2, w + 2 * padding - 2
    if ho < 1 or wo < 1:
        raise ValueError(f"input {h}x{w} with padding {padding} is smaller than the kernel")
    th, tw = -(-ho // 2), -(-wo // 2)  # 2x2 output tiles
    xp = jnp.pad(
        x, ((0, 0), (padding, padding + 2 * th - ho), (padding, padding + 2 * tw - wo), (0, 0))
    )
    # B^T d B: along rows (tile row offsets 0..3), then along columns.
    rows = [xp[:, r : r + 2 * th - 1 : 2] for r in range(4)]
    v = []
    for u in _combine(B_T, rows):
        v.extend(_combine(B_T, [u[:, :, s : s + 2 * tw - 1 : 2] for s in range(4)]))
    v = jnp.stack(v, 0).reshape(16, b * th * tw, cin)
    m = jnp.einsum("kpc,kcd->kpd", v, transform_kernel(kernel.astype(x.dtype)))
    m = m.reshape(4, 4, b, th, tw, cout)
    # A^T m A: along the first tile axis, then the second; y[a][c] is output phase (a, c).
    y = [_combine(A_T, [r[j] for j in range(4)]) for r in _combine(A_T, [m[i] for i in range(4)])]
    out = jnp.stack([jnp.stack(ya, -2) for ya in y], 2)  # (b, th, 2, tw, 2, cout)
    return out.reshape(b, 2 * th, 2 * tw, cout)[:, :ho, :wo]
