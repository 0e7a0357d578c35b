"""Evaluation of gaze models: accuracy, visual KV entries, FLOPs, routing hit rate, gaze pictures.

Metric names (logged to MLflow as they are):

- ``eval/accuracy``: normalised exact match, or the option letter when a sample has options.
- ``eval/samples``, ``eval/generated_tokens``.
- ``eval/visual_entries_per_token`` / ``eval/dense_entries_per_token``: visual KV entries
  (visual and context tokens) a generated token attends, mean over layers, heads and decode
  steps (an answer that is only the end token counts its one step), under gaze / under dense
  attention over every visible region and the same context tokens;
  ``eval/entries_ratio`` and ``eval/kv_savings_pct`` compare them (a dense twin: 1.0 and 0%).
- ``eval/attention_flops_ratio``: decode attention FLOPs of gaze over dense (routing included).
- ``eval/routing_hit_rate/layer_{L}``: share of answer tokens whose routed regions (any head)
  overlap the sample's ``target_box`` (and ``target_frame``); ``eval/routing_hit_rate_random/
  layer_{L}`` the same for uniform random routing with the same budget and layout;
  ``eval/routing_hit_rate`` / ``eval/routing_hit_rate_random`` their means over layers.
  Tables report the last routed layer's, and its lift, (hit - random) / (1 - random):
  0 is random routing, 1 always finds the target (``evaluation.compare.routing_lift``).
- ``EvalConfig(random_routing_seed=S)`` (label ``...-random``): the same model and budget
  routed to pseudo-random regions, the ablation that shows what looking is worth.
- ``eval/decode_tokens_per_s``: generated tokens per second of batched generation.
"""
