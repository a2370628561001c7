"""ShapeStory: a procedural multi-shot world with ground truth (world.py), its renderer
(render.py) and the OpenCV scorer the quality benchmark uses (score.py)."""
