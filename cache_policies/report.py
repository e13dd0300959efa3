"""Routing-consistency report: one JSON-ready dict, PNG plots (matplotlib, Agg) and a rich terminal table.

    rep = build_report(trace)            # metrics + simulated hit-rate curves (plain Python types)
    paths = write_report(rep, "out/")    # report.json + srp.png, sch.png, hit_rate.png, layers.png, experts.png
    print_summary(rep)                   # rich tables on the terminal

Report keys: model, n_tokens, n_sequences, n_layers, n_expert, k, layers;
srp: [{m, value, alpha, rho_hat}] (model level); srp_layer: {m, value[L], alpha[L], rho_hat[L]};
sch: [{m, rho, value}] (model level; every m at rho = 2, every rho at m = sch_rho_m = min(16, longest
sequence)); sch_static: the same pairs;
hit_rate: [SimResult.to_dict()] over policies x sizes (x prefetch off/on); expert_freq: [L][E];
lookahead_precision: {distance: [1..D], by_distance: [D], layer: [D][L]} (metrics.lookahead_precision) or None.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np

from moelite.fileio import atomic_open

from .calibration import expert_frequency
from .metrics import lookahead_precision, sch, srp, static_sch
from .simulator import SIM_POLICIES, sweep
from .trace import Trace


def default_sizes(trace: Trace) -> list[int]:
    """Total slots at 1, 1.5, 2, 3, 4, 6, 8 x the active experts per token (L*k), capped at L*E."""
    active, full = trace.n_layers * trace.k, trace.n_layers * trace.n_expert
    return sorted({min(full, int(round(r * active))) for r in (1, 1.5, 2, 3, 4, 6, 8)})


def build_report(
    trace: Trace,
    *,
    ms: Sequence[int] = (4, 16, 64, 256),
    rhos: Sequence[float] = (1, 2, 4),
    sizes: Sequence[int] | None = None,
    policies: Sequence[str] = SIM_POLICIES,
    layer_m: int = 16,
    sim_m: int = 16,
    prefetch: bool | None = None,
    precision: float | None = None,
) -> dict:
    """Every metric of the module docstring. SCH is computed for each m at rho = 2 and each rho at m = 16
    (the paper's defaults); the simulator sweeps `policies` over `sizes` (default_sizes) without
    prefetch and, when prefetch is True (None: when the trace has lookahead_ids or precision is given),
    once more with next-layer prefetch."""
    if prefetch is None:
        prefetch = trace.lookahead_ids is not None or precision is not None
    longest = int(np.diff(trace.offsets).max())
    ms = [m for m in ms if m <= longest] or [longest]
    layer = srp(trace, min(layer_m, longest), level="layer")
    m_rho = min(16, longest)
    pairs = sorted({(m, 2.0) for m in ms} | {(m_rho, float(r)) for r in rhos})
    sizes = sizes or default_sizes(trace)
    sims = [
        s
        for pf in ((False, True) if prefetch else (False,))
        for s in sweep(trace, policies, sizes, m=sim_m, prefetch=pf, precision=precision)
    ]
    return {
        "model": trace.model,
        "n_tokens": trace.n_tokens,
        "n_sequences": trace.n_sequences,
        "n_layers": trace.n_layers,
        "n_expert": trace.n_expert,
        "k": trace.k,
        "layers": trace.layers.tolist(),
        "srp": [dict(zip(("value", "alpha", "rho_hat"), map(_plain, srp(trace, m))), m=m) for m in ms],
        "srp_layer": {
            "m": min(layer_m, longest),
            "value": layer.value.tolist(),
            "alpha": layer.alpha.tolist(),
            "rho_hat": layer.rho_hat.tolist(),
        },
        "sch_rho_m": m_rho,
        "sch": [{"m": m, "rho": r, "value": float(sch(trace, m, r))} for m, r in pairs],
        "sch_static": [{"m": m, "rho": r, "value": float(static_sch(trace, m, r))} for m, r in pairs],
        "hit_rate": [s.to_dict() for s in sims],
        "expert_freq": expert_frequency(trace).tolist(),
        "lookahead_precision": lookahead_summary(trace),
    }


def lookahead_summary(trace: Trace) -> dict | None:
    """Gate-lookahead precision per distance d (the share of layer l + d's experts the router of l + d names from
    layer l's hidden state): pooled over layers ("by_distance") and per layer ("layer", nan past the last layer).
    None when the trace holds no predictions."""
    if not trace.lookahead_depth:
        return None
    p = lookahead_precision(trace)
    return {
        "distance": list(range(1, trace.lookahead_depth + 1)),
        "by_distance": [float(np.nanmean(row)) if np.isfinite(row).any() else None for row in p],
        "layer": [[None if np.isnan(v) else float(v) for v in row] for row in p],
    }


def _plain(x):
    return x.item() if isinstance(x, np.generic) else x


# files -------------------------------------------------------------------------------------------------
def write_json(obj: dict, path: str | os.PathLike) -> None:
    """Atomic JSON write: temp file, fsync, rename."""
    with atomic_open(path, "w") as f:
        json.dump(obj, f, indent=1, allow_nan=True)


def write_report(rep: dict, out_dir: str | os.PathLike) -> list[str]:
    """report.json plus the five PNGs into out_dir (created); returns the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    out = [
        os.path.join(out_dir, name)
        for name in ("report.json", "srp.png", "sch.png", "hit_rate.png", "layers.png", "experts.png")
    ]
    write_json(rep, out[0])
    plot_srp(rep, out[1])
    plot_sch(rep, out[2])
    plot_hit_rate(rep, out[3])
    plot_layers(rep, out[4])
    plot_expert_heatmap(rep, out[5])
    return out


# plots -------------------------------------------------------------------------------------------------
def _figure(title: str, xlabel: str, ylabel: str, size=(6, 4)):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return plt, fig, ax


def _legend_outside(ax) -> None:
    """The legend right of the axes, never over the data."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize="small")


def _save(plt, fig, path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_srp(rep: dict, path) -> None:
    """SRP vs segment length m (model level), with the alpha = 0 floor 2r/(1+r)."""
    plt, fig, ax = _figure(f"SRP — {rep['model'] or 'trace'}", "segment length m", "SRP (model level)")
    ms = [r["m"] for r in rep["srp"]]
    ax.plot(ms, [r["value"] for r in rep["srp"]], "o-", label="SRP")
    r = rep["k"] / rep["n_expert"]
    ax.axhline(2 * r / (1 + r), color="grey", ls=":", label="floor 2r/(1+r)")
    ax.set_xscale("log", base=2)
    ax.set_ylim(0, 1)
    _legend_outside(ax)
    _save(plt, fig, path)


def plot_sch(rep: dict, path) -> None:
    """SCH vs cache ratio rho at m = 16 (oracle and static)."""
    plt, fig, ax = _figure(
        f"SCH — {rep['model'] or 'trace'}", "cache ratio rho (slots / active experts)", "hit rate (model level)"
    )
    m16 = rep["sch_rho_m"]
    for key, label in (("sch", "SCH oracle"), ("sch_static", "static SCH")):
        pts = sorted((r["rho"], r["value"]) for r in rep[key] if r["m"] == m16)
        ax.plot(*zip(*pts), "o-", label=f"{label}, m={m16}")
    ax.set_ylim(0, 1)
    _legend_outside(ax)
    _save(plt, fig, path)


def plot_hit_rate(rep: dict, path) -> None:
    """Simulated hit rate vs total slots per policy (dotted: with prefetch), one colour per curve; Belady black
    (an oracle: the ceiling, not a policy one can select)."""
    plt, fig, ax = _figure("simulated hit rate", "cache size (expert slots, all layers)", "hit rate (%)", size=(8, 4))
    colours = iter(plt.get_cmap("tab10").colors * 3)
    for label, rows in _by_curve(rep).items():
        pts = sorted((r["total_slots"], 100 * r["hit_rate"]) for r in rows)
        key = (rows[0]["policy"], rows[0]["prefetch"])
        if key[0] in ORACLES:
            ax.plot(*zip(*pts), "k:" if key[1] else "k--", label=label)
        else:
            ax.plot(*zip(*pts), "o:" if key[1] else "o-", color=next(colours), label=label)
    ax.set_ylim(0, 100)
    _legend_outside(ax)
    _save(plt, fig, path)


def plot_layers(rep: dict, path) -> None:
    """Per layer, one quantity per axis: SRP at the report's layer m (top), and the simulated hit rate of each
    selectable policy at the middle cache size (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["total_slots"] for r in rep["hit_rate"]})
    mid = sizes[len(sizes) // 2]
    rows = [r for r in rep["hit_rate"] if r["total_slots"] == mid and not r["prefetch"] and r["policy"] not in ORACLES]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    x = np.arange(rep["n_layers"])
    width = 0.8 / max(len(rows), 1)
    top.bar(x + 0.4 - width / 2, rep["srp_layer"]["value"], 0.6, color="tab:blue")
    top.set_ylabel(f"SRP (m={rep['srp_layer']['m']})")
    top.set_ylim(0, 1)
    top.set_title("per layer")
    for i, r in enumerate(rows):
        bottom.bar(x + i * width, [100 * v for v in r["layer_hit_rate"]], width, label=r["policy"])
    bottom.set_ylabel(f"hit rate at {mid} slots (%)")
    bottom.set_ylim(0, 100)
    bottom.set_xlabel("layer")
    bottom.set_xticks(x + 0.4 - width / 2, [str(b) for b in rep["layers"]])
    _legend_outside(bottom)
    _save(plt, fig, path)


def plot_expert_heatmap(rep: dict, path) -> None:
    """Expert frequency heatmap [layer, expert]: fraction of tokens routed to each expert."""
    plt, fig, ax = _figure("expert frequency", "expert", "layer", size=(9, 5))
    img = ax.imshow(np.array(rep["expert_freq"]), aspect="auto", interpolation="nearest", cmap="viridis")
    fig.colorbar(img, ax=ax, label="fraction of tokens")
    _save(plt, fig, path)


# terminal ----------------------------------------------------------------------------------------------
def print_summary(rep: dict, console=None) -> None:
    """Rich tables: SRP / SCH per m, then hit rate per policy and cache size (rates in %)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    head = (
        f"{rep['model'] or 'trace'}: {rep['n_sequences']} seq, {rep['n_tokens']} tokens, "
        f"L={rep['n_layers']} E={rep['n_expert']} k={rep['k']}"
    )
    metrics = Table(title=head, caption=SRP_LINE + "\n" + SCH_LINE)
    for col in ("m", "SRP (%)", "alpha", "rho_hat", "SCH rho=2 (%)", "static SCH rho=2 (%)"):
        metrics.add_column(col, justify="right")
    sch2 = {r["m"]: r["value"] for r in rep["sch"] if r["rho"] == 2.0}
    static2 = {r["m"]: r["value"] for r in rep["sch_static"] if r["rho"] == 2.0}
    for r in rep["srp"]:
        metrics.add_row(
            str(r["m"]),
            _pct(r["value"]),
            str(r["alpha"]),
            f"{r['rho_hat']:.2f}",
            _pct(sch2.get(r["m"])),
            _pct(static2.get(r["m"])),
        )
    console.print(metrics)
    sizes = sorted({r["total_slots"] for r in rep["hit_rate"]})
    sims = Table(
        title="simulated hit rate (%) by cache size in expert slots",
        caption="rows marked 'oracle' need the future: a ceiling to compare with, not a policy to select",
    )
    sims.add_column("policy")
    for n in sizes:
        sims.add_column(str(n), justify="right")
    for label, rows in _by_curve(rep).items():
        by_size = {r["total_slots"]: r["hit_rate"] for r in rows}
        sims.add_row(label, *(_pct(by_size.get(n)) for n in sizes))
    console.print(sims)
    look = rep.get("lookahead_precision")
    if look:
        pairs = ", ".join(
            f"{d} layer{'s' if d > 1 else ''} ahead {_pct(v)} %" for d, v in zip(look["distance"], look["by_distance"])
        )
        console.print(f"gate lookahead precision (share of a layer's experts predicted from an earlier layer): {pairs}")


SRP_LINE = (
    "SRP(m): how much of a window of m tokens' expert choices a fixed set of experts covers "
    "(1 = every token in the window uses the same experts; the floor is what random routing gives)"
)
SCH_LINE = (
    "SCH(m, rho): the hit rate of a cache of rho x k slots per layer filled with the window's most used "
    "experts (oracle: chosen knowing the window; static: from the previous window)"
)
ORACLES = ("belady", "sch_oracle", "oracle")


def _by_curve(rep: dict) -> dict[str, list[dict]]:
    """Simulation rows grouped per curve ("policy" or "policy +prefetch"); oracles marked; a curve identical to an
    earlier one (consistency is LRU without prefetch) is merged into its label instead of repeated."""
    curves: dict[str, list[dict]] = {}
    for r in rep["hit_rate"]:
        name = r["policy"] + (" (oracle)" if r["policy"] in ORACLES else "") + (" +prefetch" if r["prefetch"] else "")
        curves.setdefault(name, []).append(r)
    merged: dict[str, list[dict]] = {}
    for name, rows in curves.items():
        key = sorted((r["total_slots"], r["hit_rate"]) for r in rows)
        same = next((k for k, v in merged.items() if sorted((r["total_slots"], r["hit_rate"]) for r in v) == key), None)
        if same is None:
            merged[name] = rows
        else:
            merged[f"{same} = {name}"] = merged.pop(same)
    return merged


def _pct(x) -> str:
    return "-" if x is None or x != x else f"{100 * x:.2f}"
