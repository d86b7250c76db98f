"""(e) How noisy is a run's FID? Many sample sets of its model, scored like the run scores them.

A run reports the mean FID over `sample.sets` sets of `sample.n_samples` and the floor
(the same protocol on random subsets of the training split). With a few hundred images
per set, both move between noise draws; this script measures by how much, for a
finished run: it samples `--sets` sets with new noise (seed `--seed`, not the run's),
scores each set and as many floor subsets, and prints the mean, the spread, the
standard error of the mean and the ratio to the floor, next to what the run reported
and the number of sets that would keep the ratio's standard error under 0.1.

    .venv/bin/python benchmarks/fid_protocol_noise.py [--run runs/main/digits] [--sets 20] [--quick]

Run it in the workspace (GENDAG_HOME) of the run; it reads the run's config.json and
summary.json, its model, dataset and feature network, and writes nothing there.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import _common as C  # noqa: I001  (puts the repo on sys.path)
import numpy as np

from models.data import load_splits
from models.metrics import reference_set, scoring_blocks, summarize_blocks
from models.samplers import settings_for
from models.sampling import Sampler, shards
from tasks.config import RunConfig
from tasks.data import dataset_folder
from tasks.evaluate import feature_path, image_scores
from tasks.infra import Ref, folder_digest, home

TARGET = "report: mean FID over many sets / floor, its standard error, and the sets a run needs"


def _find(pattern: str, digest: str) -> Path:
    """The folder matching `pattern` under the workspace whose content hash is `digest`."""
    for folder in sorted(home().glob(pattern)):
        if folder.is_dir() and folder_digest(folder) == digest:
            return folder
    raise SystemExit(f"no folder {pattern} with content hash {digest[:12]} in {home()}")


def main() -> None:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, default=Path("runs/main/digits"), help="a finished image run's folder")
    p.add_argument("--sets", type=int, default=20)
    p.add_argument("--seed", type=int, default=1000, help="noise seed of the new sets (the run used its own)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    sets = 3 if args.quick else args.sets
    run = home() / args.run
    cfg = RunConfig.model_validate(json.loads((run / "config.json").read_text()))
    summary = json.loads((run / "summary.json").read_text())
    model_dir = _find(f".gendag/models/{cfg.name}-*", summary["model_hash"])
    data_dir = dataset_folder(cfg.data.spec(cfg.seed))
    weights = feature_path(cfg, summary["data_hash"])
    for path in (data_dir, weights):
        if not path.exists():
            raise SystemExit(f"{path} is missing: run this in the workspace of {args.run}")
    splits = load_splits(data_dir)
    entry = next((s for s in cfg.sample.samplers if s.nfe), cfg.sample.samplers[0])  # a fixed-step one if any
    setting = settings_for(entry.method, [max(entry.nfe)] if entry.nfe else [], entry.params)[0]
    label, n = setting.label, cfg.sample.n_samples
    print(f"run {run} · model {model_dir.name} · data {data_dir.name} · {sets} sets of {n} at {label}")

    t = time.perf_counter()
    sampler = Sampler(str(model_dir), cfg.seed, None, threads=args.threads)
    x = np.concatenate([sampler.run(setting, i, k, args.seed)["x"] for i, k in shards(n * sets, cfg.sample.shard_size)])
    sampled = time.perf_counter() - t
    reference = reference_set(splits.test, splits.kind, cfg.evaluate.n_reference)
    features, data = Ref("feature-extractor", str(weights), ""), Ref("dataset", str(data_dir), summary["data_hash"])
    blocks = scoring_blocks(splits.train, {label: x}, n, sets, args.seed)
    scores = {key: image_scores(v, reference, features, cfg, data) for key, v in blocks.items()}  # the run's cache
    m = summarize_blocks(scores)
    fid, sd, floor, floor_sd = m[f"fid@{label}"], m[f"fid_sd@{label}"], m["fid_floor"], m["fid_sd_floor"]
    ratio = fid / floor
    ratio_se = ratio * math.hypot(sd / fid, floor_sd / floor) / math.sqrt(sets)  # delta method
    per_set_ratio_sd = ratio_se * math.sqrt(sets)
    reported, reported_floor = summary["metrics"].get(f"fid@{label}", math.nan), summary["metrics"]["fid_floor"]
    rows = [
        [f"fid@{label}", fid, sd, sd / math.sqrt(sets), reported],
        ["fid_floor", floor, floor_sd, floor_sd / math.sqrt(sets), reported_floor],
        ["ratio", ratio, per_set_ratio_sd, ratio_se, reported / reported_floor],
    ]
    C.print_table(f"{sets} new sets of {n} (seed {args.seed}) vs the run's {cfg.sample.sets} sets",
                  ["metric", "mean", "sd per set", "std. error", "the run reported"], rows)
    summary_out = {
        f"fid@{label} (mean of {sets})": round(fid, 4), "std. error": round(sd / math.sqrt(sets), 4),
        "fid_floor": round(floor, 4), "ratio": round(ratio, 3), "ratio std. error": round(ratio_se, 3),
        "sets for ratio s.e. <= 0.1": math.ceil((per_set_ratio_sd / 0.1) ** 2),
        "sampling s": round(sampled, 1),
    }
    C.finish(args, "e_fid_protocol_noise", TARGET, summary_out, {"rows": rows, "run": str(args.run)})


if __name__ == "__main__":
    main()
