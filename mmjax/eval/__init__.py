"""Scoring a model the way the papers do: few-shot captioning and VQA,
multiple-choice text tasks, with KV-cache decoding (`mmjax.generate`).

`python -m mmjax.eval` scores a checkpoint; the training loop runs the same
tasks at `train.eval_every` through the evaluator registry."""
