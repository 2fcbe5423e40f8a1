"""The fine-tuned REALM in MLflow's model registry.

- The finetune stage logs the model (flows/realm_pyfunc.py: a pyfunc whose `predict` takes
  questions and returns answers with their evidence) to its run and registers it as a new version
  of `MODEL_NAME`, tagged with the stage's fingerprint (tasks/training.stage_fingerprint: its
  params and the bytes of its deps).
- The evaluate stage finds the version whose fingerprint is that of the data/finetune it scored,
  tags it with its exact match, and moves the alias `champion` to it only when that EM is at least
  the current champion's (ties promote: the newer model of equal quality). The decision is a tag
  of the evaluate run and of the version.
- `realm ask --model models:/realm@champion` and `realm serve-api --model ...` answer from it.
"""

from __future__ import annotations

import json
import logging
import tempfile
import warnings
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from realm_core.config import Params
from realm_core.paths import Paths

MODEL_NAME = "realm"
ALIAS = "champion"
ARTIFACT_NAME = "realm_qa"
FINGERPRINT_TAG = "realm.finetune_fingerprint"
EM_TAG = "exact_match"
DECISION_TAG = "realm.champion_decision"
VERSION_TAG = "realm.registered_version"

PYFUNC_FILE = Path(__file__).with_name("realm_pyfunc.py")
REALM_CORE = Path(__file__).resolve().parents[1] / "realm_core"
# What the model imports; pinned to this environment's versions so a serving environment matches.
REQUIREMENTS = ("mlflow", "torch", "transformers", "faiss-cpu", "safetensors", "pydantic", "pyyaml", "numpy", "pandas")
EXAMPLE_QUESTION = "who wrote the nutcracker ballet?"

log = logging.getLogger(__name__)
# predict takes MLflow's DataFrame and returns one; the explicit signature above replaces type hints
warnings.filterwarnings("ignore", message="Add type hints to the `predict` method", category=UserWarning)


def _requirements() -> list[str]:
    pins = []
    for name in REQUIREMENTS:
        try:
            v = version(name).split("+")[0]  # torch's "+cpu" is a wheel tag, not a PyPI version
        except PackageNotFoundError:
            continue
        pins.append(f"{name}=={v}")
    return pins


def _signature():
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Array, ColSpec, Object, ParamSchema, ParamSpec, Property, Schema

    evidence = Object(
        [
            Property("rank", "long"),
            Property("block_id", "long"),
            Property("title", "string"),
            Property("text", "string"),
            Property("score", "double"),
            Property("probability", "double"),
        ]
    )
    return ModelSignature(
        inputs=Schema([ColSpec("string", "question")]),
        outputs=Schema(
            [
                ColSpec("string", "question"),
                ColSpec("string", "answer"),
                ColSpec("double", "score"),
                ColSpec("long", "block_id"),
                ColSpec("string", "block_title"),
                ColSpec(Array(evidence), "evidence"),
            ]
        ),
        params=ParamSchema([ParamSpec("top_k", "long", 5)]),
    )


def log_finetuned_model(client: MlflowClient, run_id: str, params: Params, paths: Paths, fingerprint: str):
    """Log data/finetune as a pyfunc model of run `run_id` and register it; returns the ModelVersion."""
    import pandas as pd

    from realm_core.modeling import backbone_dir, load_tokenizer

    mlflow.set_tracking_uri(client.tracking_uri)
    # Created here, in the run's experiment: left to Model.log it lands in the active (Default) experiment
    logged = client.create_logged_model(
        experiment_id=client.get_run(run_id).info.experiment_id,
        name=ARTIFACT_NAME,
        source_run_id=run_id,
        tags={FINGERPRINT_TAG: fingerprint},
        model_type="realm-open-qa",
    )
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = Path(tmp) / "tokenizer"
        load_tokenizer(backbone_dir(params.model.backbone)).save_pretrained(tokenizer)
        info = mlflow.models.Model.log(
            artifact_path=None,
            name=ARTIFACT_NAME,
            flavor=mlflow.pyfunc,
            run_id=run_id,
            model_id=logged.model_id,
            python_model=str(PYFUNC_FILE),
            code_paths=[str(REALM_CORE)],
            artifacts={
                "finetune": str(paths.finetune),
                "blocks": str(paths.blocks),
                "params": str(paths.root / "params.yaml"),
                "tokenizer": str(tokenizer),
            },
            signature=_signature(),
            input_example=pd.DataFrame({"question": [EXAMPLE_QUESTION]}),
            pip_requirements=_requirements(),
            registered_model_name=MODEL_NAME,
        )
    mv = client.get_model_version(MODEL_NAME, str(info.registered_model_version))
    client.set_model_version_tag(MODEL_NAME, mv.version, FINGERPRINT_TAG, fingerprint)
    client.set_tag(run_id, VERSION_TAG, f"{MODEL_NAME}/{mv.version}")
    return mv


@dataclass
class ChampionDecision:
    version: str | None  # the version scored, None when no registered version matches data/finetune
    promoted: bool
    message: str


def _em(mv) -> float | None:
    raw = (mv.tags or {}).get(EM_TAG)
    return float(raw) if raw is not None else None


def champion(client: MlflowClient, name: str = MODEL_NAME):
    """The version the alias points at, or None."""
    try:
        return client.get_model_version_by_alias(name, ALIAS)
    except MlflowException:
        return None


def promote_if_champion(
    client: MlflowClient, run_id: str, fingerprint: str, exact_match: float, name: str = MODEL_NAME
) -> ChampionDecision:
    """Tag the version registered for `fingerprint` with its EM; move `champion` to it when that EM
    is at least the champion's. The decision is tagged on run `run_id` and on the version."""
    try:
        versions = client.search_model_versions(f"name = '{name}' and tag.`{FINGERPRINT_TAG}` = '{fingerprint}'")
    except MlflowException:  # no registered model of that name yet
        versions = []
    if not versions:
        decision = ChampionDecision(
            None,
            False,
            f"no version of model {name!r} was registered for this data/finetune (fingerprint {fingerprint})",
        )
    else:
        mv = max(versions, key=lambda v: int(v.version))
        client.set_model_version_tag(name, mv.version, EM_TAG, json.dumps(exact_match))
        current = champion(client, name)
        current_em = _em(current) if current is not None else None
        if current is None or current_em is None:
            promoted, why = True, "there was no champion with an exact match"
        elif current.version == mv.version:
            promoted, why = True, f"it already was the champion (EM {current_em:g} before)"
        elif exact_match >= current_em:
            promoted, why = True, f"EM {exact_match:g} >= {current_em:g} of the champion, version {current.version}"
        else:
            promoted, why = False, f"EM {exact_match:g} < {current_em:g} of the champion, version {current.version}"
        if promoted:
            client.set_registered_model_alias(name, ALIAS, mv.version)
        verb = f"version {mv.version} is now {name}@{ALIAS}" if promoted else f"version {mv.version} not promoted"
        decision = ChampionDecision(mv.version, promoted, f"{verb}: {why}")
        client.set_model_version_tag(name, mv.version, DECISION_TAG, decision.message)
    client.set_tag(run_id, DECISION_TAG, decision.message)
    log.info("%s", decision.message)
    return decision


def load_answerer(model_uri: str):
    """The Answerer inside a logged REALM model (`models:/realm@champion`, `runs:/<id>/realm_qa`, a path)."""
    model = mlflow.pyfunc.load_model(model_uri)
    inner = model.unwrap_python_model()
    if not hasattr(inner, "answerer"):
        raise ValueError(f"{model_uri}: not a REALM question-answering model (flows/realm_pyfunc.py)")
    return inner.answerer
