"""annotations/: the importers of labels from clinical tools.

- findings: the finding map (coded concepts and text -> a study class), the
  box and issue rows both importers return;
- sr: boxes from DICOM SR TID 1500 measurement reports (OHIF, highdicom, dcmqi);
- seg: boxes from DICOM SEG segments, one per connected component (Slicer, MONAI Label).
"""
