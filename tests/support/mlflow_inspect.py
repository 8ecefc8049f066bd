"""Reads a registered model through MLflow's own Python client, for the
registry tests: prints JSON with every version (its run's tags, status and
loss history), the version an alias names, and downloads that version's
artifacts.

usage: mlflow_inspect.py TRACKING_URL MODEL ALIAS OUT_DIR
"""
import json
import sys

import mlflow
from mlflow import MlflowClient

url, model, alias, out = sys.argv[1:5]
mlflow.set_tracking_uri(url)
client = MlflowClient(url)
result = {"versions": []}
for v in client.search_model_versions(f"name='{model}'"):
    run = client.get_run(v.run_id)
    history = client.get_metric_history(v.run_id, "loss")
    evals = client.get_metric_history(v.run_id, "eval_loss")
    result["versions"].append({
        "version": int(v.version),
        "run_id": v.run_id,
        "source": v.source,
        "tags": v.tags,
        "run_tags": run.data.tags,
        "run_status": run.info.status,
        "params": run.data.params,
        "loss": sorted([m.step, m.value] for m in history),
        "eval_loss": sorted([m.step, m.value] for m in evals),
    })
named = client.get_model_version_by_alias(model, alias)
result["alias_version"] = int(named.version)
result["downloaded"] = mlflow.artifacts.download_artifacts(artifact_uri=named.source, dst_path=out)
print(json.dumps(result))
