"""How an encoded image or an array becomes the model's pixels: the format every image is made (image_format.py),
decoding, EXIF orientation, mode and resizing with Pillow at ingest and prediction (decode.py), and the same
steps as TensorFlow ops inside the SavedModel's `serve_bytes` (graph.py), side by side so that a change to one
shows in the other.

May import: nothing else of tasks/ (the config's DataConfig only).
"""
