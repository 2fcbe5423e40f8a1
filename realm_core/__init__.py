"""realm_core: REALM (Guu et al., ICML 2020) in pure PyTorch + transformers + faiss.

No orchestration lives here: nothing in this package imports prefect, mlflow or dvc.
"""

import os

# Nothing may download weights or data at run time: make any accidental hub call fail
# at once instead of hanging on a network that is not there.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# Weights load from local disk in well under a second: transformers' per-file "Loading
# weights" bars only bury the training progress bars.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
