"""A registered gendag model as a standard MLflow model:

    model = mlflow.pyfunc.load_model("models:/<name>@champion")
    x = model.predict({"n": 16, "seed": 0})  # or a DataFrame with columns n, seed: its first row

returns `n` samples (an array of n x the data's shape) drawn with the sampler setting that scored
best when the model was registered, from the same seed the same samples.

This file is a "models from code" model: MLflow copies it into the model and runs it to load the
model, so nothing is pickled. The weights are the run's safetensors file and JSON spec, read by
safetensors alone; a source dataset's points (flow matching from a dataset) are a `.npy` read
without pickle; the `models` package travels with the model (its `code/`), so loading needs
neither the gendag workspace nor any of its services. `tasks.register` writes the model."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel


class GendagSampler(PythonModel):
    """Samples from a gendag model with one sampler setting (`model_config["sampler"]`)."""

    def load_context(self, context) -> None:
        import numpy as np

        from models.checkpoint import SPEC_FILE, ModelSpec, load_model
        from models.samplers import Setting

        folder = Path(context.artifacts["weights"]).parent
        self.model = load_model(folder)
        self.shape = tuple(ModelSpec.from_json((folder / SPEC_FILE).read_text()).data_shape)
        source = context.artifacts.get("source")
        self.source = np.load(source, allow_pickle=False) if source else None
        sampler = context.model_config["sampler"]
        self.setting = Setting(sampler["method"], sampler["nfe"], tuple(sampler["params"].items()))

    def predict(self, context, model_input: pd.DataFrame, params=None):
        """`n` samples from `seed` (0 if not given): the first row of the input, which MLflow
        makes a DataFrame of the model's signature (columns n, seed) from a dict or a DataFrame."""
        import torch

        from models.sampling import start_draw
        from models.samplers import sample_with

        request = model_input.iloc[0].to_dict()
        generator = torch.Generator().manual_seed(int(request.get("seed", 0)))
        x = start_draw(self.model, self.shape, int(request["n"]), generator, self.source)
        return sample_with(self.setting, self.model, x, generator).x.numpy()


mlflow.models.set_model(GendagSampler())
