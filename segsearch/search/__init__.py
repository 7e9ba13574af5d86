"""The search half: YAML space → Optuna in Ray Tune → one Ray Train job per trial.

`tuner` runs the search (sampler, scheduler, resume, result), `trial` one trial, `train` the
training loop on every worker, `capacity` what a cluster can run, `placement` the placement-group
workaround, `progress` the lines a user reads.

Nothing is imported here: a Train worker imports `segsearch.search.train` without Tune, MLflow
and the tracker; the search itself is `segsearch.search.tuner.run_search`.
"""
