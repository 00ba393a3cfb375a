"""Resource predictions for tasks: duration (s), tokens, memory growth (MB), CPU (s).

Memory is how far the task grows its worker's RSS (the worker's interpreter is there
anyway), CPU the seconds of CPU it uses: both are learnt per task, from its own features,
so a type that mixes sleeps and no-ops is not given the product of two averages.

    features.py   what a prediction is made from; the training rows
    models.py     fitting, the fast one-row path, saving and loading the models
    predictor.py  the Predictor: model, else per-type average, else defaults
    training.py   training from the event log (the training child's entry point)

Files under the models directory: `predictor.joblib` (models and report, what
`Predictor.load` reads) and `predictor-report.json` (the same report, for `cat`/`jq`).
"""

from cortex.services.scheduler.prediction.features import TARGETS
from cortex.services.scheduler.prediction.models import MODEL_FILE, REPORT_FILE
from cortex.services.scheduler.prediction.predictor import DEFAULTS, Prediction, Predictor
from cortex.services.scheduler.prediction.training import history_from_events

__all__ = ["DEFAULTS", "MODEL_FILE", "REPORT_FILE", "TARGETS", "Prediction", "Predictor",
           "history_from_events"]
