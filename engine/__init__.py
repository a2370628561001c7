"""The story engine. Read in this order:

  story.py    the data model (Story, Shot, settings) and its JSON
  engine.py   StoryEngine.render: planning, the shot cache, outputs
  sampler.py  the flow-matching loop, joint and shot by shot, the context K/V cache in use
  backbone.py + processors.py   diffusers' Wan transformer with the MoC and per-shot processors
then events.py (what the UI receives), shot_cache.py, context_cache.py, routing_report.py,
model.py / text.py / codec.py (loading), video.py, training.py, parallel.py (one story across
several processes: sequence parallelism), ranks.py (the app across them: rank 0 sends each job to
the others), and engine/moc (the attention).
Importing `engine` imports nothing heavy.
"""
