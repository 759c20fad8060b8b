"""The learning-curve model: plug-in accuracy after ``s`` local steps on one emulator layout. Pure functions.

Fitted to the kit's own runs (:mod:`edge_broker.controller.measure`, ``learning_curves.json``) as a
saturating curve ``acc(s) = a - b * exp(-s / c)``. In a federated round the curve is used from wherever
the global model stands: with the global accuracy ``A``, ``k`` more steps on layout ``(a, c)`` give
``a - (a - A) * exp(-k / c)`` (the same curve, started where it passes ``A``), so a device pulls the
global model toward its layout's plateau ``a``, up or down.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from device_runtime.errors import DeftError

CURVES_FILE = Path(__file__).with_name("learning_curves.json")


class CurveError(DeftError, ValueError):
    """The learning-curve file is missing or malformed; the message names the file and the fix."""


class Curve(BaseModel):
    """``acc(s) = a - b * exp(-s / c)``; ``rmse`` is the fit's root-mean-square error on its points."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    a: float = Field(gt=0, le=1, description="plateau accuracy")
    b: float
    c: float = Field(gt=0, description="steps scale")
    rmse: float = Field(ge=0)


def accuracy(curve: Curve, steps: float | np.ndarray) -> float | np.ndarray:
    """Accuracy after ``steps`` steps from the curve's own start."""
    return curve.a - curve.b * np.exp(-np.asarray(steps, dtype=float) / curve.c)


def advance(curve: Curve, current: float, steps: float) -> float:
    """Accuracy after ``steps`` more steps from a model at accuracy ``current`` (see the module doc)."""
    return curve.a - (curve.a - current) * math.exp(-steps / curve.c)


def fit_curve(steps: Sequence[float], acc: Sequence[float]) -> Curve:
    """Least-squares fit of ``a - b exp(-s/c)`` (scipy ``curve_fit``, bounded so ``a`` is an accuracy)."""
    from scipy.optimize import curve_fit

    s, y = np.asarray(steps, dtype=float), np.asarray(acc, dtype=float)
    if len(s) < 3:
        raise CurveError(f"a curve needs at least 3 points, got {len(s)}")
    p0 = (float(y.max()), float(y.max() - y.min()), float(np.median(s[s > 0])) if (s > 0).any() else 50.0)
    (a, b, c), _ = curve_fit(lambda x, a, b, c: a - b * np.exp(-x / c), s, y, p0=p0,
                             bounds=([0.0, -1.0, 1.0], [1.0, 1.0, 1e5]), maxfev=20000)
    rmse = float(np.sqrt(np.mean((a - b * np.exp(-s / c) - y) ** 2)))
    return Curve(a=float(a), b=float(b), c=float(c), rmse=rmse)


class LayoutCosts(BaseModel):
    """What one layout costs a device, measured with its curve (reference machine: ``reference_profile``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    layout: str
    curve: Curve
    peak_rss_mb: float = Field(gt=0)
    median_step_s: float = Field(gt=0)
    trainable_values: int = Field(gt=0)
    initial_accuracy: float


def load_curves(path: str | Path = CURVES_FILE) -> tuple[list[LayoutCosts], str]:
    """The layouts (smallest first) and the reference profile id they were measured on."""
    p = Path(path)
    if not p.is_file():
        raise CurveError(f"learning-curve file {p} not found; run `python -m edge_broker.controller.measure`")
    try:
        doc = json.loads(p.read_text())
        out = [LayoutCosts(layout=name, curve=Curve(**d["fit"]), peak_rss_mb=d["peak_rss_mb"],
                           median_step_s=d["median_step_s"], trainable_values=d["trainable_values"],
                           initial_accuracy=next(x["accuracy"] for x in d["points"] if x["steps"] == 0))
               for name, d in doc["layouts"].items()]
        ref = doc["method"]["reference_profile"]
    except (json.JSONDecodeError, KeyError, TypeError, StopIteration, ValueError) as exc:
        raise CurveError(f"learning-curve file {p} is malformed ({exc}); re-run the measurement") from None
    if not out:
        raise CurveError(f"learning-curve file {p} holds no layouts")
    return sorted(out, key=lambda x: x.peak_rss_mb), ref
