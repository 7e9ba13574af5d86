"""The search half: YAML space → Optuna in Ray Tune → each trial trained in its Tune process
(one worker) or as a Ray Train job (DDP over several).

`tuner` runs the search (sampler, scheduler, resume, result), `trial` one trial, `train` the
training loop of both paths, `worker` where that loop runs (a Train worker, or the trial's own
process and its run folder), `capacity` what a cluster can run, `placement` the placement-group
workaround, `progress` the lines a user reads.

Nothing is imported here: a Train worker imports `segsearch.search.train` without Tune, MLflow
and the tracker; the search itself is `segsearch.search.tuner.run_search`.
"""
