"""Detect: the detectors, their training and the one inference path.

- models: the Faster R-CNN architectures and loading of weights;
- engine: running a detector (validation, evaluation, speed and predict);
- validation: COCO AP50 on the validation split, which picks the best epoch;
- train: the `train` verb (resumable);
- predict: the `predict` verb on a new series or volume.
"""
