"""The linear probe: the softmax head fitted to convergence on pooled features.

A frozen backbone's trial trains only ``probs`` (a softmax regression on the ``features``
output). A few epochs of mini-batch steps leave it far from converged on small data (a
logistic regression on the same features does much better), so the head is fitted
full-batch with L-BFGS instead: the trial's own loss (cross-entropy, or the L1 distance
to the one-hot label) plus an L2 penalty on standardized features, the penalty chosen by
validation loss along a path from strong to weak (each fit warm-started from the one
before) that contains scikit-learn's default (``C=1``) and stops once the validation loss
rises: weaker penalties only overfit further and are the slow fits. L-BFGS works on the
weights along the principal axes of the standardized features, each axis scaled by the
objective's curvature along it (sqrt(variance + penalty)): an exact change of variables,
the same minimum, reached in fewer steps on the correlated features of a CNN (a
fine-tuned MobileNetV2's 1,399 x 1,280 features: 1,130 -> 453 steps at SciPy's default
tolerance; 279 at :data:`FTOL`). The
standardization is folded back into the Dense kernel and bias, so the saved model is the
plain contract model.

The same probe starts the head of the fine-tuning trials of a pretrained backbone
(linear probe, then fine-tune: Kumar et al., ICLR 2022), instead of a random head.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

#: L2 strengths tried from strong to weak, times 1/N (1/N is scikit-learn's LogisticRegression(C=1)
#: on mean loss); the path stops at the first one whose validation loss is higher than the one before
L2_GRID = (1000.0, 100.0, 10.0, 1.0, 0.1, 0.01)
MAX_ITER = 500
#: a fit stops when an L-BFGS step lowers the objective by less than this (relative; SciPy's
#: default 2.2e-9 took 2.5x the steps for a training loss 0.1 % lower on a fine-tuned
#: MobileNetV2's features: 0.3358 vs 0.3361; scikit-learn's LogisticRegression stops at a
#: gradient of 1e-4 or 100 steps)
FTOL = 1e-6
#: rows projected onto the principal axes at a time: the float64 product of one block, not of all
#: N rows, is held (20,000 MobileNetV2 features: 280 MB less at the peak of a trial's evaluation)
PROJECT_ROWS = 4096
#: below this many bits of float32 resolution in the features (:func:`_resolution_bits`) a
#: trial says its head's numbers are noisy
COARSE_BITS = 10.0


@dataclass(frozen=True)
class Probe:
    """A fitted head: ``probs = softmax(features @ kernel + bias)``."""

    kernel: np.ndarray  # (D, C) float32
    bias: np.ndarray  # (C,) float32
    l2: float
    loss: str
    train_loss: float
    train_accuracy: float
    val_loss: float | None
    val_accuracy: float | None
    iterations: int
    seconds: float
    penalties_tried: int = 1
    resolution_bits: float | None = None  # see _resolution_bits

    @property
    def coarse(self) -> bool:
        """The features vary too little for a float32 head to resolve well (its numbers are noisy)."""
        return self.resolution_bits is not None and self.resolution_bits < COARSE_BITS

    def record(self) -> dict:
        """What ``metrics.json`` / ``trial.json`` say about the probe (its numbers are those of the
        float32 head the model keeps, on the float32 features)."""
        return {"method": "L-BFGS, full batch", "loss": self.loss, "l2": self.l2, "iterations": self.iterations,
                "penalties_tried": self.penalties_tried,
                "train_accuracy": self.train_accuracy, "val_accuracy": self.val_accuracy,
                "feature_resolution_bits": None if self.resolution_bits is None else round(self.resolution_bits, 1),
                "seconds": round(self.seconds, 3)}

    def save(self, path) -> None:
        np.savez(path, kernel=self.kernel, bias=self.bias,
                 info=np.asarray([self.l2, self.train_loss, self.train_accuracy,
                                  np.nan if self.val_loss is None else self.val_loss,
                                  np.nan if self.val_accuracy is None else self.val_accuracy,
                                  self.iterations, self.seconds, self.penalties_tried,
                                  np.nan if self.resolution_bits is None else self.resolution_bits], np.float64),
                 loss=np.asarray(self.loss))

    @classmethod
    def load(cls, path) -> "Probe":
        with np.load(path) as z:
            info = z["info"]
            return cls(kernel=z["kernel"], bias=z["bias"], l2=float(info[0]), loss=str(z["loss"]),
                       train_loss=float(info[1]), train_accuracy=float(info[2]),
                       val_loss=None if np.isnan(info[3]) else float(info[3]),
                       val_accuracy=None if np.isnan(info[4]) else float(info[4]),
                       iterations=int(info[5]), seconds=float(info[6]),
                       penalties_tried=int(info[7]) if len(info) > 7 else 1,
                       resolution_bits=float(info[8]) if len(info) > 8 and not np.isnan(info[8]) else None)


def _softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise softmax of ``z``, computed in place (``z`` is returned)."""
    z -= z.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


def _loss_grad(params, x, y, num_classes: int, l2: float, loss: str):
    """Loss and gradient at ``params`` (float64, for L-BFGS); the two products with ``x`` run
    in ``x``'s dtype (float32: half the memory traffic, gradient within 1e-6 relative of
    float64's), sums and the penalty in float64. Both products read ``x`` itself: ``dz.T @ x``
    is ~35 % faster per evaluation than ``x.T @ dz`` from a transposed copy, which makes the
    two products stream two arrays instead of one (1,399 x 1,280 features, one core)."""
    n, d = x.shape
    w64 = params[: d * num_classes].reshape(d, num_classes)
    p = x @ w64.astype(x.dtype)
    p += params[d * num_classes:].astype(x.dtype)
    _softmax(p)
    rows = np.arange(n)
    py = p[rows, y]
    if loss == "l1":  # mean over classes of |onehot - p| = 2 (1 - p_y) / C
        value = float(np.mean(2.0 * (1.0 - py) / num_classes, dtype=np.float64))
        dz = p * py[:, None]  # d/dz of -(2/C) p_y = (2/C) p_y (p - onehot)
        dz[rows, y] -= py
        dz *= 2.0 / (num_classes * n)
    else:
        value = float(-np.mean(np.log(np.maximum(py, 1e-12)), dtype=np.float64))
        dz = p
        dz[rows, y] -= 1.0
        dz /= n
    value += 0.5 * l2 * float(np.dot(params[: d * num_classes], params[: d * num_classes]))
    gw = (dz.T @ x).T.astype(np.float64)
    gw += l2 * w64
    return value, np.concatenate([gw.ravel(), dz.sum(axis=0, dtype=np.float64)])


def _preconditioned(u, curvature, x, y, num_classes: int, l2: float, loss: str):
    """:func:`_loss_grad` in the scaled variables ``u = w * curvature[:, None]`` (one scale per row of w)."""
    k = len(curvature)
    params = u.copy()
    params[: k * num_classes] = (u[: k * num_classes].reshape(k, num_classes) / curvature[:, None]).ravel()
    value, grad = _loss_grad(params, x, y, num_classes, l2, loss)
    grad[: k * num_classes] = (grad[: k * num_classes].reshape(k, num_classes) / curvature[:, None]).ravel()
    return value, grad


def head_numbers(x: np.ndarray, y: np.ndarray, kernel, bias, loss: str) -> tuple[float, float]:
    """(loss, accuracy) of the softmax head ``(kernel, bias)`` on features ``x``, as Keras computes
    them in float32: SparseCategoricalCrossentropy (probabilities clipped to [1e-7, 1 - 1e-7]),
    or MeanAbsoluteError against the one-hot label (= 2 (1 - p_y) / C)."""
    p = _softmax(np.asarray(x, np.float32) @ np.asarray(kernel, np.float32) + np.asarray(bias, np.float32))
    py = p[np.arange(len(y)), y]
    value = float(np.mean(2.0 * (1.0 - py) / p.shape[1])) if loss == "l1" else \
        float(-np.mean(np.log(np.clip(py, 1e-7, 1 - 1e-7))))
    return value, float(np.mean(p.argmax(axis=1) == y))


def _folded(w: np.ndarray, b: np.ndarray, mu: np.ndarray, sd: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The float32 Dense kernel and bias on raw features of the head ``w, b`` on standardized ones."""
    return (w / sd[:, None]).astype(np.float32), (b - (mu / sd) @ w).astype(np.float32)


def _resolution_bits(mu: np.ndarray, sd: np.ndarray) -> float:
    """log2 of how many float32 steps the median varying feature spans across the images
    (its spread over its mean, over float32's relative step): ~23 for ordinary CNN features,
    single digits when they vary by less than ~1e-5 of their mean (a mostly frozen random
    backbone), where a float32 head on them computes its logits through cancelling terms."""
    varying = sd > 0
    if not varying.any():
        return 0.0
    spread = sd[varying] / np.maximum(np.abs(mu[varying]), sd[varying])
    return float(np.log2(max(float(np.median(spread)), 1e-30) / np.finfo(np.float32).eps))


def fit_probe(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray | None, y_val: np.ndarray | None, *,
              num_classes: int, loss: str = "crossentropy") -> Probe:
    """Fit the softmax head on pooled features (see the module docstring).

    Args:
        x_train, y_train: pooled features ``(N, D)`` and labels of the training images.
        x_val, y_val: of the validation images (chooses the L2 strength), or None.
        num_classes: classes ``C``.
        loss: ``crossentropy`` or ``l1`` (the trial's loss).

    Returns:
        The :class:`Probe` with the kernel and bias of the raw (unstandardized) features.
    """
    from scipy.optimize import minimize
    from threadpoolctl import threadpool_limits  # a dependency of scikit-learn

    t0 = time.perf_counter()
    xs = np.array(x_train, np.float64)  # a copy, standardized in place (one float64 matrix, not three)
    y = np.asarray(y_train, np.int64)
    mu, sd = xs.mean(axis=0), xs.std(axis=0)
    bits = _resolution_bits(mu, sd)
    # constant features (relative to the largest spread) are left as they are; the others are
    # scaled whatever their size (a frozen random backbone's features can be ~1e-12)
    sd[~(sd > 1e-6 * sd.max())] = 1.0
    xs -= mu
    xs /= sd
    has_val = x_val is not None and len(x_val) > 0
    x32 = np.asarray(x_train, np.float32)
    xv32 = np.asarray(x_val, np.float32) if has_val else None
    yv = np.asarray(y_val, np.int64) if has_val else None
    n = xs.shape[0]
    # An exact change of variables that L-BFGS converges in far fewer steps on: the weights
    # along the principal axes of the standardized features (eigenvectors V of X'X; axes of
    # zero variance are dropped: an optimal w has no part there), each scaled by
    # sqrt(its variance + l2), the curvature of the objective along it. Same objective,
    # same minimum (w = V u / scale); see _preconditioned.
    variances, axes = np.linalg.eigh(xs.T @ xs / n)
    keep = variances > 1e-10 * max(float(variances.max()), 1e-300)
    variances, axes = variances[keep], axes[:, keep]
    k = axes.shape[1]
    xp = np.empty((n, k), np.float32)  # the projection row block by row block: no (N, D) float64 product
    for i in range(0, n, PROJECT_ROWS):
        xp[i:i + PROJECT_ROWS] = xs[i:i + PROJECT_ROWS] @ axes
    del xs
    wp, b = np.zeros((k, num_classes)), np.zeros(num_classes)
    best, iterations, tried = None, 0, 0
    for scale in (L2_GRID if has_val else (1.0,)):
        l2 = scale / n
        curvature = np.sqrt(variances + l2)
        start = np.concatenate([(wp * curvature[:, None]).ravel(), b])  # warm start: the weaker penalty's
        with threadpool_limits(1):  # small matrices: BLAS threads only fight (2.5x slower on a busy 2-core machine)
            res = minimize(_preconditioned, start, args=(curvature, xp, y, num_classes, l2, loss), jac=True,
                           method="L-BFGS-B", options={"maxiter": MAX_ITER, "ftol": FTOL})
        iterations += int(res.nit)
        wp = res.x[: k * num_classes].reshape(k, num_classes) / curvature[:, None]
        b = res.x[k * num_classes:].copy()
        kernel, bias = _folded(axes @ wp, b, mu, sd)
        # scored as the model computes it: float32 features through the folded float32 head
        score = head_numbers(xv32, yv, kernel, bias, loss)[0] if has_val else 0.0
        tried += 1
        if best is not None and score > best[0]:
            break  # past the minimum of the validation loss along the path
        if best is None or score < best[0]:
            best = (score, l2, kernel, bias)
    _, l2, kernel, bias = best
    train_loss, train_acc = head_numbers(x32, y, kernel, bias, loss)
    val_loss, val_acc = head_numbers(xv32, yv, kernel, bias, loss) if has_val else (None, None)
    return Probe(kernel=kernel, bias=bias, l2=float(l2), loss=loss, train_loss=train_loss, train_accuracy=train_acc,
                 val_loss=val_loss, val_accuracy=val_acc, iterations=iterations,
                 seconds=time.perf_counter() - t0, penalties_tried=tried, resolution_bits=bits)
