"""Pictures and tables of a run, written to its report folder (and logged to MLflow)."""

from __future__ import annotations

import functools
import json
import math
import re
import textwrap
import threading
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from models.samplers import parse_label  # noqa: E402
from tasks.infra import Ref  # noqa: E402

PRIMARY = {"images": "fid", "points": "w2"}


def _load(ref: Ref) -> dict[str, np.ndarray]:
    with np.load(ref.path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def _image_tile(images: np.ndarray, cols: int = 8) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> one (rows*H, cols*W, C) picture in [0, 1]."""
    n, c, h, w = images.shape
    rows = math.ceil(n / cols)
    canvas = np.ones((rows * (h + 1), cols * (w + 1), c), dtype=np.float32)
    for i, img in enumerate(images):
        r, k = divmod(i, cols)
        canvas[r * (h + 1): r * (h + 1) + h, k * (w + 1): k * (w + 1) + w] = (img.transpose(1, 2, 0) + 1) / 2
    return np.clip(canvas, 0, 1)


def _title(label: str, width: int = 30) -> str:
    """A setting label wrapped at its commas to fit over a panel."""
    return "\n".join(textwrap.wrap(label.replace(",", ", "), width))


def _panels(count: int, size: float = 3.0):
    cols = min(count, 4)
    rows = math.ceil(count / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols, size * rows), squeeze=False)
    for ax in axes.flat[count:]:
        ax.axis("off")
    return fig, list(axes.flat)


def sample_grid(samples: dict[str, Ref], reference: np.ndarray, path: Path, n: int = 64) -> Path:
    sets = {"real (held out)": reference[:n], **{k: _load(v)["x"][:n] for k, v in samples.items()}}
    fig, axes = _panels(len(sets))
    for ax, (label, images) in zip(axes, sets.items()):
        tile = _image_tile(images)
        ax.imshow(tile[..., 0] if tile.shape[-1] == 1 else tile, cmap="gray", vmin=0, vmax=1)
        ax.set_title(_title(label), fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def scatter(samples: dict[str, Ref], reference: np.ndarray, path: Path, n: int = 2000) -> Path:
    fig, axes = _panels(len(samples) + 1)
    sets = {"real (held out)": reference[:n], **{k: _load(v)["x"][:n] for k, v in samples.items()}}
    lim = np.abs(reference).max() * 1.3
    for ax, (label, pts) in zip(axes, sets.items()):
        ax.scatter(pts[:, 0], pts[:, 1], s=1, alpha=0.5)
        ax.set(title=_title(label), xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal")
        ax.title.set_fontsize(8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def trajectories(sample: Ref, label: str, path: Path) -> Path | None:
    data = _load(sample)
    if "trajectory" not in data:
        return None
    traj = data["trajectory"]  # (steps, n, 2)
    fig, ax = plt.subplots(figsize=(5, 5))
    for i in range(traj.shape[1]):
        ax.plot(traj[:, i, 0], traj[:, i, 1], lw=0.4, alpha=0.4, color="tab:gray")
    ax.scatter(traj[0, :, 0], traj[0, :, 1], s=4, color="tab:blue", label="source (t=0)")
    ax.scatter(traj[-1, :, 0], traj[-1, :, 1], s=4, color="tab:red", label="sample (t=1)")
    ax.set(title=f"trajectories, {label}", aspect="equal")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


DENSITY_LIKELIHOODS = ("exact", "ode")  # estimators of a density (not a bound): what a heat map shows
DENSITY_GRID = 80  # points per side of the heat map's grid


def density_map(model: Ref, likelihood: str, dataset: str, reference: np.ndarray, path: Path,
                seed: int = 0) -> Path:
    """Heat maps of the model's density on a grid over the data (by the `likelihood` estimator),
    beside the true density where the toy has one and a histogram of the held-out points."""
    from models.likelihoods import nll_per_example
    from models.toys import true_log_density

    lim = np.abs(reference).max() * 1.3
    axis = np.linspace(-lim, lim, DENSITY_GRID)
    grid = np.stack(np.meshgrid(axis, axis), -1).reshape(-1, 2).astype(np.float32)
    nll = nll_per_example(model.uri, likelihood, grid, None, seed, batch_size=len(grid), threads=None)
    panels = {f"model ({likelihood})": np.exp(-nll)}
    true = true_log_density(dataset, grid)
    if true is not None:
        panels["true density"] = np.exp(true)
    fig, axes = _panels(len(panels) + 1)
    extent = (-lim, lim, -lim, lim)
    for ax, (label, values) in zip(axes, panels.items()):
        ax.imshow(values.reshape(DENSITY_GRID, DENSITY_GRID), origin="lower", extent=extent, cmap="magma")
        ax.set_title(label, fontsize=8)
    axes[len(panels)].hist2d(reference[:, 0], reference[:, 1], bins=DENSITY_GRID, range=[[-lim, lim]] * 2,
                             cmap="magma")
    axes[len(panels)].set_title("held-out points", fontsize=8)
    for ax in axes[:len(panels) + 1]:
        ax.set(aspect="equal", xticks=[], yticks=[])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def curves(metrics: dict[str, float], name: str) -> dict[str, list[tuple[float, float, float]]]:
    """The primary metric by sampler: {"ddim,eta=0,spacing=trailing": [(nfe, value, sd), ...]}
    sorted by NFE; an adaptive sampler's point sits at its measured NFE. Untrained baselines
    are left out (they are read against, not plotted)."""
    found: dict[str, list[tuple[float, float, float]]] = {}
    for key, value in metrics.items():
        metric, _, label = key.partition("@")
        if metric != name or "untrained" in label:
            continue
        method, params = parse_label(label)
        asked = float(params.pop("nfe", "nan"))
        nfe = metrics.get(f"nfe@{label}", asked)  # what the sampler really used
        group = ",".join([method] + [f"{k}={v}" for k, v in params.items()])
        found.setdefault(group, []).append((nfe, value, metrics.get(f"{name}_sd@{label}", 0.0)))
    return {group: sorted(points) for group, points in sorted(found.items())}


def quality_vs_nfe(metrics: dict[str, float], kind: str, path: Path) -> Path:
    """The primary metric against NFE, one curve per sampler, with the spread over sample sets
    as error bars when there is one, and the real-data floor."""
    name = PRIMARY[kind]
    found = curves(metrics, name)
    fig, ax = plt.subplots(figsize=(9.5, 4.6))
    colors = plt.get_cmap("tab20" if len(found) > 10 else "tab10").colors
    for i, (group, points) in enumerate(found.items()):  # a colour and a marker each: no two curves alike
        nfe, value, sd = zip(*points)
        ax.errorbar(nfe, value, yerr=sd, fmt="-" if len(points) > 1 else "", marker="osD^v<>p*hX"[i % 11],
                    color=colors[i % len(colors)], capsize=3, label=group, ms=4)
    if f"{name}_floor" in metrics:
        floor, sd = metrics[f"{name}_floor"], metrics.get(f"{name}_sd_floor", 0.0)
        ax.axhline(floor, ls="--", color="gray", label="real data (floor)")
        if sd:
            ax.axhspan(max(floor - sd, 1e-12), floor + sd, color="gray", alpha=0.15)
    ax.set(xscale="log", yscale="log", xlabel="network evaluations (NFE)", ylabel=name.upper())
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def quality_table(metrics: dict[str, float], kind: str, path: Path) -> Path:
    """Every sampler's primary metric by NFE, budgets in increasing order, and at each budget the
    best sampler among those that cost at most that much: which sampler to use for a budget."""
    name = PRIMARY[kind]
    points = sorted((nfe, value, sd, group) for group, pts in curves(metrics, name).items() for nfe, value, sd in pts)
    lines = [f"| NFE | sampler | {name} | sd over sets | best within this budget |", "|---|---|---|---|---|"]
    best = None
    for nfe, value, sd, group in points:
        best = (value, group) if best is None or value < best[0] else best
        lines.append(f"| {nfe:g} | {group} | {value:.4g} | {sd:.2g} | {best[1]} ({best[0]:.4g}) |")
    if f"{name}_floor" in metrics:
        lines.append(f"\nreal data (floor): {metrics[f'{name}_floor']:.4g}")
    path.write_text("\n".join(lines) + "\n")
    return path


def loss_curve(model: Ref, path: Path) -> Path | None:
    state = model.path / "state.json"
    if not state.exists():  # a registered model evaluated again: its loss curve is in its training run
        return None
    losses = json.loads(state.read_text())["losses"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(*zip(*losses))
    ax.set(xlabel="step", ylabel="training loss", yscale="log")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def reading_order(key: str) -> tuple:
    """Sort metric names as a person reads them: by metric, the fixed-step samplers before the
    adaptive ones (whose NFE the solver picks: the full ODE), then sampler, then NFE as a number
    (euler nfe=1, 2, 4, 16, then dopri5; not dopri5, then 1, 16, 2)."""
    metric, _, label = key.partition("@")
    method, params = parse_label(label) if label else ("", {})
    untrained = params.pop("untrained", None) is not None
    nfe = float(params.pop("nfe", "inf"))
    return metric, untrained, nfe == float("inf") and bool(label), method, sorted(params.items()), nfe


def metrics_table(metrics: dict[str, float], path: Path) -> Path:
    lines = ["| metric | value |", "|---|---|"] + [f"| {k} | {metrics[k]:.6g} |" for k in sorted(metrics, key=reading_order)]
    path.write_text("\n".join(lines) + "\n")
    return path


# pyplot's figures are one state per process: two table cells side by side draw one at a time
PLOTTING = threading.RLock()


def one_plot_at_a_time(draw):
    @functools.wraps(draw)
    def drawn(*args, **kwargs):
        with PLOTTING:
            return draw(*args, **kwargs)
    return drawn


@one_plot_at_a_time
def write_report(folder: Path, kind: str, samples: dict[str, Ref], reference: np.ndarray,
                 metrics: dict[str, float], model: Ref, density: tuple[str, str] | None = None) -> list[Path]:
    """Every picture and table of a run; returns the files written. With `density` (a density
    estimator and the dataset's name) 2-D points also get the model's density heat map."""
    folder.mkdir(parents=True, exist_ok=True)
    files = [
        quality_vs_nfe(metrics, kind, folder / "quality_vs_nfe.png"),
        quality_table(metrics, kind, folder / "quality_vs_nfe.md"),
        loss_curve(model, folder / "loss.png"),
        metrics_table(metrics, folder / "metrics.md"),
    ]
    if kind == "images":
        files.append(sample_grid(samples, reference, folder / "samples.png"))
    else:
        files.append(scatter(samples, reference, folder / "scatter.png"))
        trained = [k for k in samples if "untrained" not in k]
        best = max(trained, key=lambda k: float(parse_label(k)[1].get("nfe", 0)))  # the finest fixed grid
        files.append(trajectories(samples[best], best, folder / "trajectories.png"))
        if density and reference.shape[1] == 2:
            files.append(density_map(model, *density, reference, folder / "density.png"))
    return [f for f in files if f]


@one_plot_at_a_time
def stages_report(stage_metrics: dict[str, dict[str, float]], kind: str, folder: Path,
                  seconds: dict[str, dict[str, float]] | None = None) -> list[Path]:
    """A multi-stage graph side by side: `stages.md` (one row per stage: the wall time of its work,
    straightness and the primary metric at every sampler setting, NFE in increasing order) and
    `stages.png` (quality against NFE, one curve per stage and sampler, with the real-data floor)."""
    seconds = seconds or {}
    spent = sorted({what for times in seconds.values() for what in times}, key=_in_graph_order)
    name = PRIMARY[kind]
    folder.mkdir(parents=True, exist_ok=True)
    merged: dict[str, float] = {}
    for stage, metrics in stage_metrics.items():
        for key, value in metrics.items():
            metric, at, label = key.partition("@")
            if at and "untrained" not in label:
                merged[f"{metric}@{stage}: {label}"] = value
            elif key.endswith("_floor"):
                merged.setdefault(key, value)
    labels = sorted({key.partition("@")[2] for metrics in stage_metrics.values() for key in metrics
                     if key.startswith(f"{name}@") and "untrained" not in key},
                    key=lambda label: reading_order(f"{name}@{label}"))
    straight = any("straightness" in m for m in stage_metrics.values())
    head = ["stage"] + [f"{what} s" for what in spent] + (["straightness"] if straight else [])
    head += [f"{name} {label}" for label in labels]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for stage, metrics in stage_metrics.items():
        cells = [stage] + [_cell(seconds.get(stage, {}).get(what)) for what in spent]
        cells += [_cell(metrics.get("straightness"))] if straight else []
        cells += [_cell(metrics.get(f"{name}@{label}"), metrics.get(f"{name}_sd@{label}")) for label in labels]
        lines.append("| " + " | ".join(cells) + " |")
    if f"{name}_floor" in merged:
        lines.append(f"\nreal data (floor): {merged[f'{name}_floor']:.4g}")
    table = folder / "stages.md"
    table.write_text("\n".join(lines) + "\n")
    return [table, quality_vs_nfe(merged, kind, folder / "stages.png")]


RUN_PARTS = ("data", "couplings", "train", "model_train", "sample", "evaluate", "report", "register")


def _in_graph_order(part: str) -> tuple[int, str]:
    """Wall-time columns in the order a graph runs its parts (unknown parts last, by name)."""
    return (RUN_PARTS.index(part) if part in RUN_PARTS else len(RUN_PARTS), part)


def _cell(value: float | None, sd: float | None = None) -> str:
    if value is None:
        return "—"
    return f"{value:.4g} ± {sd:.2g}" if sd else f"{value:.4g}"
