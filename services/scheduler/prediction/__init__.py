"""Resource predictions for tasks: duration (s), tokens, memory growth (MB), CPU (s).

Memory is how far the task grows its worker's RSS (the worker's interpreter is there
anyway), CPU the seconds of CPU it uses: both are learnt per task, from its own features,
so a type that mixes sleeps and no-ops is not given the product of two averages.

    history.py    the rows a model learns from (from the event log; no scikit-learn)
    features.py   what a prediction is made from
    models.py     fitting, the fast one-row path, saving and loading the models
    predictor.py  the Predictor: model, else per-type average, else defaults
    training.py   the training child's entry point (`python -m` this package)

Files under the models directory: `predictor.joblib` (models and report, what
`Predictor.load` reads) and `predictor-report.json` (the same report, for `cat`/`jq`).
Import the modules themselves: this one stays empty so the training child can count its
rows before it loads scikit-learn.
"""
