"""The serving formats of a model, written beside model.keras and checked against Keras before they are published.

- `saved_model`: the two signatures of signatures.py (uint8 images; encoded bytes decoded and resized in the
  graph), computing in the precision the model trained in.
- `tflite`: Keras' LiteRT export (`Model.export(format="litert")`: an ExportArchive, then the TFLite converter),
  with `export.tflite_quantization` (`int8` calibrated on training images).
- `onnx`: Keras' ONNX export (`Model.export(format="onnx")`, tf2onnx underneath), the one path that converts a
  Keras 3 functional model on this stack without writing the graph by hand.
TFLite and ONNX compute in float32 whatever the training precision: their converters and runtimes want it
(keras#20710). Each file is then checked against Keras (parity.py) before anything is published.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import warnings

import numpy as np

from pipeline_config import ExportConfig, PipelineConfig
from tasks.data.reader import first_images
from tasks.errors import PipelineError
from tasks.model.precision import with_dtype_policy
from tasks.model.published import load_model
from tasks.registry.models import resolve_model
from tasks.serve.parity import check_parity
from tasks.store import storage
from tasks.store.lease import stage_lease
from tasks.store.publish import MANIFEST, read_manifest
from tasks.store.refs import CACHE_PREFIX, DatasetArtifact, class_names
from tasks.store.staging import local_dataset, local_file
from tasks.store.storage import join

log = logging.getLogger("tfpipe.export")

FORMAT_FILES = {"saved_model": "saved_model", "tflite": "model.tflite", "onnx": "model.onnx"}
CALIBRATION_IMAGES = 500  # int8: training images the converter measures activation ranges on


def write_format(model, directory: str, name: str, cfg: ExportConfig, dataset: DatasetArtifact) -> dict:
    """Write one format of `model` (a loaded, portable model) into `directory`; returns what its manifest entry
    says besides the figures."""
    import tensorflow as tf

    from tasks.serve.signatures import SIGNATURES, serving_archive

    os.makedirs(directory, exist_ok=True)
    path = join(directory, FORMAT_FILES[name])
    if name == "saved_model":
        archive = serving_archive(model, dataset.image_shape, dataset.image_format,
                                  class_names(dataset.label_names, dataset.num_classes))
        archive.write_out(path, verbose=False)
        return {"path": FORMAT_FILES[name], "signatures": list(SIGNATURES)}
    float32_model = with_dtype_policy(model, "float32")
    float32_model(np.zeros([1, *dataset.image_shape], np.uint8))  # the exporters refuse a model never called
    if name == "onnx":
        with warnings.catch_warnings():  # tf2onnx's check of np.object warns on NumPy 2; nothing for a user to do
            warnings.simplefilter("ignore", FutureWarning)
            float32_model.export(path, format="onnx", verbose=False)
        return {"path": FORMAT_FILES[name], "precision": "float32"}
    quantization = cfg.tflite_quantization
    options = {}
    if quantization != "none":
        options["optimizations"] = [tf.lite.Optimize.DEFAULT]
    if quantization == "float16":
        options["target_spec"] = {"supported_types": [tf.float16]}
    if quantization == "int8":
        calibration = first_images(dataset, "train", CALIBRATION_IMAGES)
        options["representative_dataset"] = lambda: ([image[None]] for image in calibration)
    float32_model.export(path, format="litert", verbose=False, **options)
    return {"path": FORMAT_FILES[name], "precision": "float32", "quantization": quantization}


def export_formats(model, directory: str, formats: list[str], cfg: ExportConfig,
                   dataset: DatasetArtifact) -> dict[str, dict]:
    """Write `formats` of `model` into `directory` and check each against Keras; returns the manifest's
    `exports` entries: path, settings and figures ("saved_model_bytes" is the serve_bytes signature's)."""
    entries = {name: write_format(model, directory, name, cfg, dataset) for name in formats}
    if not entries:
        return {}
    figures = check_parity(model, {name: join(directory, entry["path"]) for name, entry in entries.items()},
                           cfg, dataset)
    for name, entry in entries.items():
        entry["parity"] = figures[name]
    if "saved_model" in entries:
        entries["saved_model"]["parity_serve_bytes"] = figures["saved_model_bytes"]
        entries["saved_model"]["parity_pixels"] = figures["saved_model_pixels"]
    log.info("exported %s, each agreeing with Keras on %s of %d test images", ", ".join(entries),
             " / ".join(f"{figures[n]['label_agreement']:.1%}" for n in entries), figures[formats[0]]["samples"])
    return entries


def model_dataset(root: str, manifest: dict, local_cache: str) -> DatasetArtifact:
    """The dataset a published model trained on, staged locally: its test split is the parity sample."""
    from tasks.store.refs import resolve_cache_ref

    fingerprint = manifest["dataset_fingerprint"]
    try:
        dataset = resolve_cache_ref(root, f"{CACHE_PREFIX}{fingerprint}").dataset
    except PipelineError:
        raise PipelineError(f"the dataset {fingerprint[:12]} that model {manifest['fingerprint'][:12]} trained on is "
                            f"not under {root} (removed by tfpipe gc?): its test images are what exports are checked "
                            "on; run tfpipe ingest with the model's config (its manifest's `config`) first") from None
    return local_dataset(dataset, local_cache)


def export_published(cfg: PipelineConfig, model_ref: str, formats: list[str]) -> dict:
    """Add `formats` to a published model (`champion`, a directory or a fingerprint), with the settings of
    `cfg.export`: written and checked locally, copied beside model.keras under the model's lease, then its
    manifest rewritten in one step (formats it has are written again: their settings may have changed).
    Returns the new manifest."""
    unknown = [name for name in formats if name not in FORMAT_FILES]
    if unknown:
        raise PipelineError(f"--format {', '.join(unknown)}: no such format; choose from {', '.join(FORMAT_FILES)}")
    root = cfg.artifacts.root
    uri, manifest = resolve_model(root, model_ref)
    with stage_lease(root, "train", manifest["fingerprint"]):
        manifest = read_manifest(uri) or manifest
        dataset = model_dataset(root, manifest, cfg.artifacts.local_cache)
        model = load_model(local_file(join(uri, manifest["model_path"]), cfg.artifacts.local_cache))
        with tempfile.TemporaryDirectory(prefix="tfpipe-export-") as tmp:
            entries = export_formats(model, tmp, formats, cfg.export, dataset)
            for entry in entries.values():
                _copy_in(join(tmp, entry["path"]), join(uri, entry["path"]))
            if "files" in manifest:  # an object store's manifest lists every file with its size
                added = {os.path.relpath(os.path.join(d, f), tmp).replace(os.sep, "/"): os.path.getsize(os.path.join(d, f))
                         for d, _, names in os.walk(tmp) for f in names}
                kept = {name: size for name, size in manifest["files"].items()
                        if not any(name == e["path"] or name.startswith(e["path"] + "/") for e in entries.values())}
                manifest["files"] = {**kept, **added}
        manifest["exports"] = {**manifest.get("exports", {}), **entries}
        if "saved_model" in entries:
            manifest["saved_model_path"] = entries["saved_model"]["path"]
        storage.write_json(join(uri, MANIFEST), manifest)
    log.info("model %s: %s written beside it", manifest["fingerprint"][:12], ", ".join(entries))
    return manifest


def _copy_in(local_path: str, path: str) -> None:
    """A written format (a file or a directory) to its place in a published model, replacing what was there."""
    storage.remove(path)
    if os.path.isdir(local_path):
        if storage.is_local(path):
            shutil.copytree(local_path, path)
        else:
            storage.upload(local_path, path)
    else:
        storage.upload_file(local_path, path)


def missing_formats(cfg: ExportConfig, manifest: dict) -> list[str]:
    """The configured formats a published model lacks (train reuses the model and adds them)."""
    return [name for name in cfg.formats if name not in manifest.get("exports", {})]
