"""Dataset: de-identified volumes in, COCO slice datasets out.

- slices: canonical PNG slices and one COCO JSON per patient;
- split: the patient-level stratified train/val/test split (and folds);
- canonical: the one display orientation of every slice;
- data: the COCO slice datasets, crops and samplers training and testing read.
"""
