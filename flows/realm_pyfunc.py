"""The fine-tuned REALM as an MLflow pyfunc model (MLflow's "models from code": this file is stored
with the model and run when it loads; flows/registry.py logs it).

    model = mlflow.pyfunc.load_model("models:/realm@champion")
    model.predict(pd.DataFrame({"question": ["who wrote hamlet?"]}), params={"top_k": 5})

One row per question: `answer`, its `score` (reader span logit + f(x, z), ORQA), the `block_id` and
`block_title` it comes from, and `evidence`, the retrieved blocks with titles, f(x, z) and p(z|x)
(the JSON of `realm ask --json`, realm_core/answer.py). The artefacts are the finetune stage's
directory (query tower, reader, frozen block index), the blocks, params.yaml and the tokenizer,
so the model answers without the project's data/ or the backbone package.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

DEFAULT_TOP_K = 5  # retrieved blocks listed per answer, as `realm ask`


class RealmQA(PythonModel):
    def load_context(self, context) -> None:
        from realm_core.answer import Answerer

        a = {k: Path(v) for k, v in context.artifacts.items()}
        self.answerer = Answerer.from_files(a["params"], a["finetune"], a["blocks"], a["tokenizer"])

    def predict(self, context, model_input, params: dict | None = None) -> pd.DataFrame:
        top_k = int((params or {}).get("top_k") or DEFAULT_TOP_K)
        if isinstance(model_input, pd.DataFrame):
            questions = model_input["question"].tolist()
        elif isinstance(model_input, str):
            questions = [model_input]
        else:
            questions = list(model_input)
        return pd.DataFrame([self.answerer(str(q), top_k).to_dict() for q in questions])


mlflow.models.set_model(RealmQA())
