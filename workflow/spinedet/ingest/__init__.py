"""Ingest: a raw hospital export in, pseudonymous volumes and boxes out.

- inventory: every file accounted for, one target series per patient;
- convert: the selected series to NIfTI with dcm2niix (stays in restricted/);
- deidentify: pseudonyms, scrubbed sidecars, boxes in voxel space;
- dicom, dicom_to_nifti, quarantine: the DICOM reading, dcm2niix and the
  quarantine reasons these verbs share;
- annotation_sheet: the annotation sheet's reader, shared by deidentify and
  the annotations verb;
- annotations/: the `annotations` verb (table) and its readers of DICOM SR,
  SEG and COCO.
"""
