"""Resource predictions for tasks: duration (s), tokens, memory growth (MB), CPU (s).

Memory is how far the task grows its worker's RSS (the worker's interpreter is there
anyway), CPU the seconds of CPU it uses: both are learnt per task, from its own features,
so a type that mixes sleeps and no-ops is not given the product of two averages.

    history.py    the rows a model learns from (from the event log; no scikit-learn)
    features.py   what a prediction is made from (plain Python)
    flat.py       the trained trees as numpy arrays: one-row predictions, their file
    models.py     fitting with scikit-learn, flattening and checking (training child only)
    predictor.py  the Predictor: model, else per-type average, else defaults
    training.py   the training child's entry point (`python -m` this package)

Files under the models directory: `predictor.npz` (flat arrays and report, what
`Predictor.load` reads with numpy alone) and `predictor-report.json` (the same report,
for `cat`/`jq`). A `predictor.joblib` of an older version is not read: retrain.
Import the modules themselves: this one stays empty so the training child can count its
rows before it loads scikit-learn, and the scheduler never loads it.
"""
