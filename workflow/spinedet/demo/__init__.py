"""The demo's synthetic hospital export.

- synthesize: the `synthesize` verb, which writes it;
- phantom: the cervical-spine anatomy and its lesions, as continuous shapes;
- rendering: series geometry, rendering a phantom into a slice stack, boxes;
- dicom_writer: MR Image Storage and Enhanced MR Image Storage files as a scanner writes them;
- identities: the cohort, fake identities and export layouts;
- truth: the lesion masks kept for tests;
- preview: the montage of the export.
"""
