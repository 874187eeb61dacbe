"""Reason codes of the files the inventory quarantines, shared by the
inventory that assigns them and the report that names them (without
pulling pydicom into the report's environment)."""

# Reason codes of quarantined files. The summary counts them; the detail
# column of files.csv says what exactly is wrong with each file.
REASONS = {
    "not_dicom": "not a DICOM file",
    "unreadable": "DICOM header cannot be parsed",
    "truncated": "file is truncated",
    "no_pixel_data": "no pixel data",
    "unsupported_sop_class": "SOP class is neither MR Image Storage nor Enhanced MR Image Storage",
    "missing_attributes": "attributes needed for the geometry are missing",
    "duplicate": "duplicate SOPInstanceUID",
    "not_in_cohort": "PatientID is not in cohort.csv",
    "broken_link": "symbolic link to nothing",
    "unreadable_folder": "folder cannot be listed (permissions)",
    "link_loop": "directory link to a folder already read",
    "not_a_file": "not a regular file",
    "sr_not_measurement_report": "structured report that is not a TID 1500 measurement report",
}
