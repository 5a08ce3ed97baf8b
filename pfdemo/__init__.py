"""pfdemo: the demo world. Procedural scenes with ground truth (``pfdemo.scenes``), the trainer of the bundled
demo models (``pfdemo.train``, ``pfcam train-demo``) and the scenes as bench-loc's default data
(``pfdemo.bench``). It sits above pfnet and cams and uses both; neither imports it."""
