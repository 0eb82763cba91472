"""The #205 numbers: geometry metrics per condition x method x layer, behaviour, H1 and H3.

Everything here is a function of what the stages stored (persona vectors as
safetensors, eval summaries), so a report can be redrawn from a finished store.
Layers are keyed by the write-up's names (``"20"``), with the model's own
``hidden_states`` index recorded beside them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from explore_persona_space import leakage
from explore_persona_space.geometry import em_axis, load_vectors, m1, m1_test, m2_test, nearest_centroid
from explore_persona_space.stats import p_text, spearman_exact, two_proportion_test


@dataclass(frozen=True)
class Design:
    """What the analysis needs to know about the experiment (the script fills it in)."""

    personas: tuple[str, ...]  # the 12 the metrics run over
    induction: Mapping[str, str]  # EM condition -> induction persona ("E0" -> "assistant")
    conditions: tuple[str, ...]  # display order: base, E0..E4, benign
    base: str = "base"
    reference: str = "E0"  # the EM axis of M2 is reference - base
    m2_exclude: tuple[str, ...] = ("assistant",)
    headline_layer: int = 20
    n_folds: int = 5
    seed: int = 42


class Geometry:
    """The persona vectors of one condition, rows picked by persona name."""

    def __init__(self, path: Path) -> None:
        self.arrays, self.meta = load_vectors(path)
        self.personas: list[str] = self.meta["personas"]
        self.layers: list[int] = self.meta["layers"]

    def methods(self) -> list[str]:
        return list(self.meta["methods"])

    def vectors(self, method: str, layer: int, personas: Sequence[str]) -> np.ndarray:
        """Persona vectors ``[P, H]`` (means over questions)."""
        rows = [self.personas.index(p) for p in personas]
        return self.arrays[f"{method}.persona"][rows, self.layers.index(layer)]

    def per_question(self, method: str, layer: int, personas: Sequence[str]) -> np.ndarray:
        rows = [self.personas.index(p) for p in personas]
        return self.arrays[method][rows, :, self.layers.index(layer)]


def geometry_metrics(geo: Mapping[str, Geometry], d: Design) -> dict[str, Any]:
    """M1 (base-centred and raw), M2 and M3 for every condition present, per method and layer.

    Centre for M1: the base model's mean over the personas, the same vector for every
    condition at that method and layer (see :mod:`explore_persona_space.geometry.metrics`).
    """
    if d.base not in geo:
        return {"missing": f"no {d.base} condition: M1, M2 and the distances need it"}
    base = geo[d.base]
    out: dict[str, Any] = {"layer_index": base.meta["layer_index"], "n_layers": base.meta["n_layers"]}
    for key in ("m1", "m1_raw", "m2", "m3"):
        out[key] = {}
    for method in base.methods():
        for layer in base.layers:
            at = f"{method}/{layer}"
            b = base.vectors(method, layer, d.personas)
            centre = b.mean(axis=0)
            axis = (
                em_axis(geo[d.reference].vectors(method, layer, d.personas), b)
                if d.reference in geo
                else None
            )
            for cond in (c for c in d.conditions if c in geo):
                v = geo[cond].vectors(method, layer, d.personas)
                if cond == d.base:
                    out["m1"].setdefault(at, {})[cond] = {"m1": m1(v, centre)}
                    out["m1_raw"].setdefault(at, {})[cond] = {"m1": m1(v)}
                else:
                    out["m1"].setdefault(at, {})[cond] = asdict(m1_test(v, b, centre))
                    out["m1_raw"].setdefault(at, {})[cond] = asdict(m1_test(v, b))
                    if axis is not None:
                        m2 = m2_test(v, b, axis, list(d.personas), d.m2_exclude)
                        out["m2"].setdefault(at, {})[cond] = asdict(m2)
                m3 = nearest_centroid(geo[cond].per_question(method, layer, d.personas), d.n_folds, d.seed)
                out["m3"].setdefault(at, {})[cond] = asdict(m3)
    return out


def induction_distances(base: Geometry, d: Design, method: str = "A") -> dict[str, Any]:
    """Each induction persona's cosine distance to the assistant on the base model (headline layer).

    In the M1 frame (base mean over the 12 personas subtracted); the raw cosine is kept
    for comparison with the write-up's similarities (0.95 ... 0.78). E0 trained with no
    system message at all; its induction persona is the assistant, distance 0 by definition.
    """
    layer = d.headline_layer
    centre = base.vectors(method, layer, d.personas).mean(axis=0)
    anchor = base.vectors(method, layer, ["assistant"])[0]
    out = {}
    for cond, persona in d.induction.items():
        v = base.vectors(method, layer, [persona])[0]
        a, b = v - centre, anchor - centre
        cos = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
        raw = float(v @ anchor / (np.linalg.norm(v) * np.linalg.norm(anchor)))
        out[cond] = {"persona": persona, "cos_distance": 1 - cos, "raw_cos": raw}
    return {"method": method, "layer": layer, "by_condition": out}


def behaviour(summaries: Mapping[str, Mapping[str, Any]], d: Design) -> dict[str, Any]:
    """Source and mean-bystander rates per EM condition, H1 per testable condition."""
    rates = {cond: leakage.cell_rates(s) for cond, s in summaries.items()}
    h1 = []
    for cond, s in summaries.items():
        persona = d.induction[cond]
        bystanders = [p for p in rates[cond]["bystander"]["personas"] if p != persona]
        if persona not in s["personas"] or persona == s["source"]:
            h1.append(
                {"condition": cond, "persona": persona, "testable": False, "why": "not in the eval grid"}
            )
            continue
        own, rest = leakage.group_rate(s, [persona]), leakage.group_rate(s, bystanders)
        test = two_proportion_test(own["k"], own["n"], rest["k"], rest["n"])
        h1.append({
            "condition": cond, "persona": persona, "testable": True, "own": own, "others": rest,
            "p_fisher": test.p_fisher, "p_z": test.p_z, "p_text": p_text(test.p_fisher),
        })  # fmt: skip
    return {"rates": rates, "h1": h1}


def h3(distances: Mapping[str, Any] | None, rates: Mapping[str, Any]) -> dict[str, Any]:
    """Spearman rho of mean bystander leakage against the induction persona's cosine distance, exact p."""
    if not distances:
        return {"rho": None, "why": "no base geometry"}
    conds = [c for c in distances["by_condition"] if c in rates]
    x = [distances["by_condition"][c]["cos_distance"] for c in conds]
    y = [rates[c]["bystander"]["rate"] for c in conds]
    try:
        res = spearman_exact(x, y)
    except ValueError as exc:  # fewer than 3 conditions, or a constant sequence
        return {"rho": None, "why": str(exc), "conditions": conds, "x": x, "y": y}
    return {"rho": res.rho, "p_exact": res.p_exact, "n": res.n, "conditions": conds, "x": x, "y": y}


def analyze(geo_paths: Mapping[str, Path], summaries: Mapping[str, Mapping[str, Any]], d: Design) -> dict:
    """Everything the report draws and tabulates, JSON-able."""
    geo = {cond: Geometry(path) for cond, path in geo_paths.items()}
    metrics = geometry_metrics(geo, d)
    distances = induction_distances(geo[d.base], d) if d.base in geo else None
    beh = behaviour(summaries, d)
    return {"geometry": metrics, "distances": distances, **beh, "h3": h3(distances, beh["rates"])}
