"""The cohort in the paper's ratio, fake identities (the PHI the pipeline must scrub) and export layouts."""

from __future__ import annotations

import datetime as dt
from typing import Callable, Sequence

import numpy as np

from spinedet.demo.dicom_writer import ds_number

DEFAULT_GROUPS = ("disc", "injured", "normal")
# Ma et al. 2020: 800 disc, 200 injured, 500 normal patients.
GROUP_RATIO = (800, 200, 500)


def group_counts(n_patients: int, groups: Sequence[str] = DEFAULT_GROUPS) -> dict[str, int]:
    """Patients per group in the 800:200:500 ratio, by largest remainder; each group
    gets at least one patient when there are at least as many patients as groups."""
    ratio = np.array(GROUP_RATIO, dtype=float)
    exact = n_patients * ratio / ratio.sum()
    counts = np.floor(exact).astype(int)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: n_patients - counts.sum()]] += 1
    if n_patients >= len(groups):
        for index in range(len(counts)):
            if counts[index] == 0:
                counts[int(np.argmax(counts))] -= 1
                counts[index] = 1
    return dict(zip(groups, (int(c) for c in counts)))


FIRST_NAMES = {
    "M": ["James", "Robert", "Michael", "David", "Thomas", "Daniel", "Paul", "Mark", "Steven", "Andrew",
          "Kevin", "Brian", "George", "Edward", "Ronald", "Anthony", "Jason", "Ryan", "Jacob", "Gary",
          "Nicholas", "Eric", "Stephen", "Jonathan", "Larry", "Justin", "Scott", "Frank", "Raymond", "Samuel"],
    "F": ["Mary", "Patricia", "Jennifer", "Linda", "Elizabeth", "Barbara", "Susan", "Jessica", "Sarah", "Karen",
          "Nancy", "Lisa", "Margaret", "Sandra", "Ashley", "Dorothy", "Kimberly", "Emily", "Donna", "Michelle",
          "Carol", "Amanda", "Melissa", "Deborah", "Stephanie", "Rebecca", "Laura", "Helen", "Sharon", "Cynthia"],
}
LAST_NAMES = ["Smith", "Johnson", "Williams", "Brown", "Jones", "Garcia", "Miller", "Davis", "Rodriguez",
              "Martinez", "Hernandez", "Lopez", "Gonzalez", "Wilson", "Anderson", "Taylor", "Moore", "Jackson",
              "Martin", "Lee", "Thompson", "White", "Harris", "Clark", "Lewis", "Robinson", "Walker", "Young",
              "Allen", "King", "Wright", "Scott", "Torres", "Nguyen", "Hill", "Flores", "Green", "Adams",
              "Nelson", "Baker", "Hall", "Rivera", "Campbell", "Mitchell", "Carter", "Roberts", "Kowalski",
              "Novak", "Schmidt", "Fischer", "Weber", "Meyer", "Wagner", "Becker", "Schulz", "Hoffmann"]
INSTITUTIONS = [
    ("Riverside General Hospital", "1200 River Road, Springfield"),
    ("St. Aldric Medical Center", "45 Cathedral Street, Northbridge"),
    ("Lakeview University Hospital", "3 Lakeview Drive, Eastport"),
    ("Mercy Valley Clinic", "780 Valley Avenue, Westfield"),
]


def _person_name(rng: np.random.Generator, sex: str | None = None) -> str:
    sex = sex or str(rng.choice(["M", "F"]))
    return f"{rng.choice(LAST_NAMES)}^{rng.choice(FIRST_NAMES[sex])}"


def fake_identity(rng: np.random.Generator, index: int) -> dict:
    """Fake but realistic patient and study attributes (the PHI of the export)."""
    sex = str(rng.choice(["M", "F"]))
    age = int(rng.integers(19, 82))
    study_date = dt.date(2016, 1, 1) + dt.timedelta(days=int(rng.integers(0, 4 * 365)))
    birth_date = study_date - dt.timedelta(days=int(age * 365.25 + rng.integers(1, 360)))
    age = (study_date - birth_date).days * 4 // 1461
    start = dt.datetime.combine(study_date, dt.time(7, 0)) + dt.timedelta(seconds=int(rng.integers(0, 11 * 3600)))
    institution, address = INSTITUTIONS[int(rng.integers(len(INSTITUTIONS)))]
    # MRNs are unique: the last four digits are the patient's index.
    patient_id = f"{int(rng.integers(1000, 9999))}{index % 10000:04d}"
    return {
        "sex": sex,
        "start": start,
        "PatientName": _person_name(rng, sex),
        "PatientID": patient_id,
        "PatientBirthDate": birth_date.strftime("%Y%m%d"),
        "PatientSex": sex,
        "PatientAge": f"{age:03d}Y",
        "PatientWeight": ds_number(round(float(rng.uniform(50, 110)), 1)),
        "InstitutionName": institution,
        "InstitutionAddress": address,
        "InstitutionalDepartmentName": "Radiology",
        "ReferringPhysicianName": _person_name(rng),
        "PerformingPhysicianName": _person_name(rng),
        "OperatorsName": _person_name(rng),
        "StationName": f"MRC{int(rng.integers(10000, 99999))}",
        "DeviceSerialNumber": str(int(rng.integers(10000, 99999))),
        "AccessionNumber": f"A{int(rng.integers(10**7, 10**8))}{index % 100:02d}",
        "StudyID": str(int(rng.integers(1000, 99999))),
        "StudyDescription": "MR CERVICAL SPINE WO CONTRAST",
    }


def study_header(identity: dict, study_uid: str, frame_uid: str) -> dict:
    start: dt.datetime = identity["start"]
    header = {key: value for key, value in identity.items() if key[0].isupper()}
    header.update({
        "StudyInstanceUID": study_uid,
        "FrameOfReferenceUID": frame_uid,
        "StudyDate": start.strftime("%Y%m%d"),
        "StudyTime": start.strftime("%H%M%S"),
        "PrivateBlocks": [(0x0029, "SPINESIM PRIVATE 1.0", {
            0x10: ("LO", f"{identity['PatientName'].replace('^', ' ')} MRN {identity['PatientID']}"),
            0x11: ("LT", f"Referred by {identity['ReferringPhysicianName'].replace('^', ' ')}, "
                         f"{identity['InstitutionName']}, born {identity['PatientBirthDate']}"),
        })],
    })
    return header


def series_times(identity: dict, minutes: float) -> dict:
    moment: dt.datetime = identity["start"] + dt.timedelta(minutes=minutes)
    date, time = moment.strftime("%Y%m%d"), moment.strftime("%H%M%S.%f")[:10]
    return {"SeriesDate": date, "SeriesTime": time, "AcquisitionDate": date, "AcquisitionTime": time,
            "ContentDate": date, "ContentTime": time}


EXPORT_STYLES = ("nested", "nested_dcm", "flat")


def file_namer(style: str, patient_number: int, series_number: int) -> Callable[[int], str]:
    """Relative paths inside DICOM/ for one series; no PHI in any name."""
    if style == "flat":
        return lambda instance: f"EXP{patient_number:05d}/IM-{series_number:04d}-{instance:04d}.dcm"
    suffix = ".dcm" if style == "nested_dcm" else ""
    return lambda instance: (f"PA{patient_number:06d}/ST000001/SE{series_number:06d}/IM{instance:06d}{suffix}")
