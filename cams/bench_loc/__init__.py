"""bench-loc (``pfcam bench-loc``, ``run_bench``): how well do the CAMs of each model x layer x method localize
the object?

One table, one row per model x layer x method plus two reference rows per model (a centred Gaussian and
seeded uniform noise used as heatmaps on the same images), with the columns

    accuracy | pointing game (15 px) | pointing game (strict) | energy in box | box accuracy | MaxBoxAccV2 |
    BoxAcc IoU.3 | BoxAcc IoU.5 | BoxAcc IoU.7 | deletion AUC | insertion AUC | ROAD MoRF | ROAD LeRF |
    ROAD combined

(definitions in :mod:`cams.metrics`, :mod:`cams.boxacc`, :mod:`cams.road` and :mod:`cams.bench_loc.accum`). Every
number is a mean over images, in [0, 1] (ROAD combined in [-0.5, 0.5]). ROAD runs on the first ``--road-n`` test
images (default 0: about 4 s per image and heatmap on the demo models, so ~2 minutes per image for the default
run's 30 heatmaps; the caption says how many were scored).

Data
----
The caller gives the images (a :class:`DataSource`: validation and test splits per preprocessing):

* the command line's default, from ``pfdemo.bench.SceneData``: held-out ``pfdemo.scenes`` rendered at each
  model's input size (preprocessing mode "full": the scene *is* the network input, so scene boxes and masks are
  already in heatmap geometry). The test split is stream ``--seed`` (default ``pfdemo.scenes.TEST_SEED``, the
  held-out stream of ``pfdemo.train``), indices ``0 .. n-1``; the box-accuracy threshold is chosen on a separate
  validation split, stream ``--seed + 1`` indices ``0 .. val_n-1``. Neither may be the training stream.
* :class:`FolderData` (``--data DIR``): a folder of the user's images with boxes, either ``DIR/boxes.csv`` (columns
  ``image,x0,y0,x1,y1[,label]``; ``image`` is a path relative to DIR; coordinates are original-image pixels,
  ``(x0, y0)`` the top-left and ``(x1, y1)`` the bottom-right corner, exclusive; several rows per image are
  several objects) or, for images the CSV does not list, a Pascal-VOC XML file with the image's stem
  (``<object><name/><bndbox><xmin/>..</bndbox></object>``; VOC corners are 1-based inclusive pixels, read as
  ``(xmin - 1, ymin - 1, xmax, ymax)``). Several objects: the *any-object* rule of :mod:`cams.metrics`
  (pointing game and energy on the union of the boxes; box accuracy: IoU >= 0.5 with any box). Images are read
  with :func:`cams.images.load_image`, preprocessed by each model's zoo entry in mode "full", and the boxes
  mapped into input geometry with :func:`cams.metrics.map_box`. Unreadable images or annotations are reported
  on stderr and skipped. The images are shuffled with ``--seed`` (default
  :data:`DEFAULT_SEED`); up to ``val_n`` of them (at most half) form
  the validation split for the threshold, up to ``n`` of the rest are the test split. Accuracy counts the
  images whose labels name one of the model's classes (a hit when the top-1 class is any of them).

Regions: the pointing game uses the object mask where there is one (scenes) and the boxes otherwise; "energy in
box" always uses the box(es); box accuracy compares boxes.

What is explained: by default each image's top-1 class (``cams.explain(targets=None)``), as in the CAM
"top-1 localization" protocol, so a misclassified image is scored on the CAM of the wrong class; with
``--target label`` the ground-truth class (Zhang et al.'s cued pointing game; each image's label is its
target in the engine's one gradient call, so any head, ImageNet's 1,000 classes too). Deletion/insertion follow
the probability of the explained class. One ``explain`` call per batch per method covers all layers.
Deletion/insertion are costly and run on the first ``--faith-n`` test images only; the table caption says so.
Each test batch goes through every method and the reference heatmaps, then one deletion/insertion pass scores
all of them (the intact image and the baseline run once per image), through a copy of the model with BatchNorm
folded into the convolutions (``inference_copy``; logits equal to ~1e-6, checked on the batch before it is used).
"""
from cams.bench_loc.bench import (DEFAULT_LAYERS, DEFAULT_METHODS, DEFAULT_MODELS, DEFAULT_N, DEFAULT_VAL_N,
                                  BenchResult, NothingEvaluated, run_bench)
from cams.bench_loc.cli import add_bench_loc_parser, main_bench_loc
from cams.bench_loc.data import (CSV_NAME, DEFAULT_SEED, Annotation, BenchError, DataSource, DefaultData, FolderData,
                                 Sample, Split, data_splits, read_annotations)
from cams.bench_loc.accum import MAXBOX_KEYS, ROAD_KEYS, RowScores
from cams.bench_loc.scoring import (DEFAULT_ROAD_N, GAUSSIAN, RANDOM, Options, Row, evaluate_model,
                                    explain_methods_batch, fit_offsets, inference_copy)
from cams.bench_loc.table import KEYS, format_markdown, format_table, write_csv
from cams.bench_loc.plot import plot_depth

__all__ = [
    "run_bench", "BenchResult", "BenchError", "NothingEvaluated", "DEFAULT_MODELS", "DEFAULT_LAYERS",
    "DEFAULT_METHODS", "DEFAULT_N", "DEFAULT_VAL_N",
    "DataSource", "DefaultData", "FolderData", "Sample", "Split", "Annotation", "read_annotations", "data_splits",
    "CSV_NAME", "DEFAULT_SEED",
    "Options", "Row", "evaluate_model", "explain_methods_batch", "fit_offsets", "inference_copy",
    "GAUSSIAN", "RANDOM", "DEFAULT_ROAD_N", "RowScores", "MAXBOX_KEYS", "ROAD_KEYS",
    "KEYS", "format_table", "format_markdown", "write_csv", "plot_depth",
    "add_bench_loc_parser", "main_bench_loc",
]
