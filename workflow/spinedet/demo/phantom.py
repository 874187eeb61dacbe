"""A geometry-true numerical phantom of the cervical spine (C1 to T3).

Anatomy is described in curvilinear coordinates that follow the lordotic
curve of the vertebral bodies:

- ``x``: left-right distance from the patient's midline (mm, LPS sign: + is left),
- ``s``: arc length along the body centre line (mm, + is superior),
- ``d``: signed distance from that line in the sagittal plane (mm, + is posterior).

`render` takes any array of LPS positions (mm), converts them to (x, s, d)
and evaluates the tissues there, so a series with any orientation, spacing
or slice order samples the same patient. Sizes and signal values come from
/work/shared/notes/cervical-mri-facts.md and are drawn per patient.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

VERTEBRAE = ["C2", "C3", "C4", "C5", "C6", "C7", "T1", "T2", "T3"]
DISCS = [f"{upper}-{lower}" for upper, lower in zip(VERTEBRAE[:-1], VERTEBRAE[1:])]

# The posterior vertebral body line sits this far behind the curve (mm).
PVBL = 8.0

HERNIATION_LEVELS = {"C5-C6": 0.45, "C6-C7": 0.25, "C4-C5": 0.18, "C3-C4": 0.08, "C7-T1": 0.04}
INJURY_LEVELS = {"C3": 0.1, "C4": 0.25, "C5": 0.3, "C6": 0.25, "C7": 0.1}

# Signal relative to CSF (T2) or to fat (T1); the notes give the T2 ranges.
CONTRASTS = {
    "T2": {
        "air": 0.0, "skin": 0.35, "fat": 0.78, "muscle": 0.2, "soft_tissue": 0.3, "gland": 0.45,
        "marrow": 0.42, "cortex": 0.05, "ligament": 0.07, "annulus": 0.12, "nucleus": 0.72,
        "degenerated": 0.26, "csf": 1.0, "cord": 0.36, "epidural_fat": 0.62, "brain": 0.4,
        "cerebellum": 0.46, "herniation": 0.3, "injury": 0.78, "hemorrhage": 0.15,
        "vessel": 0.03, "vein": 0.3, "joint": 0.55, "nerve": 0.3, "mucosa": 0.45,
    },
    "T1": {
        "air": 0.0, "skin": 0.4, "fat": 1.0, "muscle": 0.36, "soft_tissue": 0.42, "gland": 0.5,
        "marrow": 0.72, "cortex": 0.05, "ligament": 0.08, "annulus": 0.3, "nucleus": 0.42,
        "degenerated": 0.32, "csf": 0.22, "cord": 0.55, "epidural_fat": 0.85, "brain": 0.58,
        "cerebellum": 0.55, "herniation": 0.38, "injury": 0.45, "hemorrhage": 0.8,
        "vessel": 0.03, "vein": 0.35, "joint": 0.25, "nerve": 0.45, "mucosa": 0.45,
    },
}


@dataclass
class Lesion:
    """One lesion in curvilinear coordinates (mm)."""

    kind: str  # "herniation" | "cord_injury"
    label: str  # class name from the config
    level: str  # disc ("C5-C6") or vertebra ("C5") it is centred on
    s_center: float
    s_half: float
    x_center: float
    x_half: float
    depth: float  # herniation: protrusion behind the PVBL; injury: AP half-size as fraction of the cord
    intensity: float  # relative signal (T2)
    swelling: float = 0.0  # cord injury: relative increase of cord size
    hemorrhage: bool = False


@dataclass
class Anatomy:
    """Every per-patient parameter of the phantom (mm, radians, relative signal)."""

    # centre line: y(z) = y0 + slope*(z - z_apex) + curvature*(z - z_apex)^2, at x = x_mid
    x_mid: float
    y0: float
    z_apex: float
    slope: float
    curvature: float
    # vertebrae, top to bottom (VERTEBRAE order)
    body_top: np.ndarray
    body_bottom: np.ndarray
    body_depth: np.ndarray
    body_tilt: np.ndarray
    marrow: np.ndarray
    body_half_width: float
    # discs (DISCS order)
    disc_degeneration: np.ndarray  # 0 healthy .. 1 degenerated
    disc_bulge: np.ndarray
    # C2 dens and the cranio-cervical junction
    dens_tip: float
    dens_radius: float
    # canal and cord
    canal_ap: float
    canal_half_width: float
    sac_half_width: float
    cord_ap: float
    cord_lr: float
    # neck and head
    neck_front: float  # anterior skin, mm in front of the anterior body line
    neck_back: float  # posterior skin, mm behind the spinal canal
    neck_half_width: float
    fat_front: float
    fat_back: float
    airway_ap: float
    spinous_length: np.ndarray
    spinous_angle: np.ndarray
    # image formation
    tissue_scale: dict = field(default_factory=dict)
    signal_scale: float = 2000.0  # CSF signal in stored units
    snr: float = 30.0
    bias_gradient: np.ndarray = field(default_factory=lambda: np.zeros(3))
    texture_waves: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))

    # -- derived geometry -------------------------------------------------
    def body_center_s(self) -> np.ndarray:
        return (self.body_top + self.body_bottom) / 2

    def disc_center_s(self) -> np.ndarray:
        return (self.body_bottom[:-1] + self.body_top[1:]) / 2

    def disc_height(self) -> np.ndarray:
        return self.body_bottom[:-1] - self.body_top[1:]

    def level_s(self, level: str) -> float:
        if level in VERTEBRAE:
            return float(self.body_center_s()[VERTEBRAE.index(level)])
        return float(self.disc_center_s()[DISCS.index(level)])

    def _arc_table(self) -> tuple[np.ndarray, np.ndarray]:
        t = np.linspace(-400.0, 400.0, 1601)
        slope = self.slope + 2 * self.curvature * t
        speed = np.sqrt(1 + slope**2)
        arc = np.concatenate([[0.0], np.cumsum((speed[1:] + speed[:-1]) / 2 * np.diff(t))])
        arc -= np.interp(0.0, t, arc)
        return t, arc

    def to_curvilinear(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """LPS points (..., 3) -> (x, s, d) by Newton steps to the nearest point of the curve."""
        x = points[..., 0] - self.x_mid
        y = points[..., 1]
        z = points[..., 2] - self.z_apex
        t = z.copy()
        for _ in range(3):
            slope = self.slope + 2 * self.curvature * t
            err_y = y - (self.y0 + self.slope * t + self.curvature * t**2)
            err_z = z - t
            gradient = -(err_y * slope + err_z)
            hessian = np.maximum(slope**2 - 2 * self.curvature * err_y + 1, 0.2)
            t = t - gradient / hessian
        slope = self.slope + 2 * self.curvature * t
        err_y = y - (self.y0 + self.slope * t + self.curvature * t**2)
        d = (err_y - (z - t) * slope) / np.sqrt(1 + slope**2)
        table_t, table_arc = self._arc_table()
        s = np.interp(t, table_t, table_arc)
        return x, s, d

    def to_lps(self, x: float, s: float, d: float) -> np.ndarray:
        """(x, s, d) -> LPS position (mm)."""
        table_t, table_arc = self._arc_table()
        t = float(np.interp(s, table_arc, table_t))
        slope = self.slope + 2 * self.curvature * t
        norm = np.sqrt(1 + slope**2)
        y = self.y0 + self.slope * t + self.curvature * t**2 + d / norm
        z = t - d * slope / norm
        return np.array([x + self.x_mid, y, z + self.z_apex])

    def tangent_lps(self, s: float) -> np.ndarray:
        """Unit vector along the curve (superior) at arc length s, LPS."""
        table_t, table_arc = self._arc_table()
        t = float(np.interp(s, table_arc, table_t))
        slope = self.slope + 2 * self.curvature * t
        vec = np.array([0.0, slope, 1.0])
        return vec / np.linalg.norm(vec)


def draw_anatomy(rng: np.random.Generator, degenerated_discs: int = 0) -> Anatomy:
    """A random adult cervical spine. `degenerated_discs` discs get darker and thinner."""
    size = rng.uniform(0.93, 1.07)
    heights = {"C3": 13.5, "C4": 14.0, "C5": 14.0, "C6": 14.3, "C7": 14.8, "T1": 16.0, "T2": 17.0, "T3": 18.0}
    depths = [15.0, 15.2, 15.6, 16.0, 16.4, 16.8, 17.5, 19.5, 21.5]
    disc_heights = np.array([4.4, 4.8, 5.0, 5.6, 5.6, 5.0, 4.0, 4.0]) * size * rng.uniform(0.92, 1.08, len(DISCS))
    degeneration = np.zeros(len(DISCS))
    if degenerated_discs:
        weights = np.array([0.05, 0.12, 0.2, 0.33, 0.25, 0.05, 0.0, 0.0])
        chosen = rng.choice(len(DISCS), size=degenerated_discs, replace=False, p=weights / weights.sum())
        degeneration[chosen] = rng.uniform(0.6, 1.0, degenerated_discs)
    disc_heights *= 1 - 0.35 * degeneration

    c2_body = rng.uniform(16.0, 19.0) * size
    dens = rng.uniform(17.0, 21.0) * size
    top, bottom = [], []
    cursor = 0.0
    for index, name in enumerate(VERTEBRAE):
        height = c2_body if name == "C2" else heights[name] * size * rng.uniform(0.95, 1.05)
        top.append(cursor)
        bottom.append(cursor - height)
        cursor -= height
        if index < len(DISCS):
            cursor -= disc_heights[index]
    top, bottom = np.array(top), np.array(bottom)
    # Put the C4-C5 disc near arc length 0 (the apex of the lordosis).
    c45 = (bottom[2] + top[3]) / 2
    shift = -c45 + rng.uniform(-12, 12)
    top, bottom = top + shift, bottom + shift

    lordosis = np.deg2rad(rng.uniform(8, 38))  # C2-C7 angle
    c2_c7_span = top[0] - bottom[5]
    curvature = np.tan(lordosis / 2) / c2_c7_span

    tissue_scale = {
        "marrow": rng.uniform(0.8, 1.25),
        "fat": rng.uniform(0.85, 1.1),
        "muscle": rng.uniform(0.85, 1.2),
        "nucleus": rng.uniform(0.85, 1.1),
        "cord": rng.uniform(0.9, 1.12),
    }
    n_waves = 4
    directions = rng.normal(size=(n_waves, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    wavelengths = rng.uniform(10, 40, n_waves)
    waves = np.column_stack([directions * (2 * np.pi / wavelengths[:, None]), rng.uniform(0, 2 * np.pi, n_waves)])

    return Anatomy(
        x_mid=rng.uniform(-4, 4),
        y0=rng.uniform(-15, 25),
        z_apex=rng.uniform(-40, 20),
        slope=rng.uniform(-0.12, 0.2),
        curvature=curvature,
        body_top=top,
        body_bottom=bottom,
        body_depth=np.array(depths) * size * rng.uniform(0.95, 1.05, len(VERTEBRAE)),
        body_tilt=np.deg2rad(rng.normal(0, 2.0, len(VERTEBRAE))),
        marrow=rng.uniform(0.88, 1.12, len(VERTEBRAE)),
        body_half_width=rng.uniform(9.5, 11.5) * size,
        disc_degeneration=degeneration,
        disc_bulge=rng.uniform(0.3, 0.9, len(DISCS)) + 1.2 * degeneration,
        dens_tip=top[0] + dens,
        dens_radius=rng.uniform(4.6, 5.4) * size,
        canal_ap=rng.uniform(14.0, 17.0),
        canal_half_width=rng.uniform(11.0, 12.5),
        sac_half_width=rng.uniform(9.0, 10.5),
        cord_ap=rng.uniform(7.0, 8.0),
        cord_lr=rng.uniform(12.0, 14.0),
        neck_front=rng.uniform(38, 52),
        neck_back=rng.uniform(52, 72),
        neck_half_width=rng.uniform(52, 66),
        fat_front=rng.uniform(3, 10),
        fat_back=rng.uniform(5, 16),
        airway_ap=rng.uniform(12, 17),
        spinous_length=np.array([26, 15, 16, 17, 22, 32, 34, 34, 32]) * size * rng.uniform(0.85, 1.15, 9),
        spinous_angle=np.deg2rad(np.array([12, 22, 24, 25, 26, 24, 35, 42, 46]) + rng.normal(0, 4, 9)),
        tissue_scale=tissue_scale,
        signal_scale=rng.uniform(1400, 2600),
        snr=rng.uniform(22, 45),
        bias_gradient=np.array([rng.uniform(-0.05, 0.05), rng.uniform(0.12, 0.28), rng.uniform(-0.1, 0.1)]),
        texture_waves=waves,
    )


def draw_lesions(rng: np.random.Generator, anatomy: Anatomy, role: str, labels: tuple[str, str]) -> list[Lesion]:
    """Lesions for a patient of group role "disc", "injured" or "normal".

    `labels` are the class names for (herniation, cord injury). Lesions are
    kept apart along the spine so each one's box holds no other lesion.
    """
    lesions: list[Lesion] = []
    injury_range = None
    if role == "injured":
        level = rng.choice(list(INJURY_LEVELS), p=list(INJURY_LEVELS.values()))
        center = anatomy.level_s(level) + rng.uniform(-4, 4)
        half = rng.uniform(9, 17)
        lesions.append(Lesion(
            kind="cord_injury", label=labels[1], level=str(level), s_center=center, s_half=half,
            x_center=rng.uniform(-1.0, 1.0), x_half=rng.uniform(0.5, 0.7) * anatomy.cord_lr / 2,
            depth=rng.uniform(0.72, 0.85), intensity=rng.uniform(0.6, 0.9),
            swelling=rng.uniform(0.15, 0.35) if rng.random() < 0.6 else 0.0,
            hemorrhage=bool(rng.random() < 0.15),
        ))
        injury_range = (center - half, center + half)
    if role == "disc":
        n_herniations = int(rng.choice([1, 2, 3], p=[0.55, 0.3, 0.15]))
    elif role == "injured":
        n_herniations = int(rng.random() < 0.35)
    else:
        n_herniations = 0
    levels = list(HERNIATION_LEVELS)
    weights = np.array(list(HERNIATION_LEVELS.values()))
    if injury_range is not None:
        for index, level in enumerate(levels):
            center = anatomy.level_s(level)
            if center + 9 > injury_range[0] - 10 and center - 9 < injury_range[1] + 10:
                weights[index] = 0.0
    n_herniations = min(n_herniations, int((weights > 0).sum()))
    if n_herniations:
        chosen = rng.choice(len(levels), size=n_herniations, replace=False, p=weights / weights.sum())
        for index in sorted(chosen):
            level = levels[index]
            disc = DISCS.index(level)
            height = anatomy.disc_height()[disc]
            lesions.append(Lesion(
                kind="herniation", label=labels[0], level=level,
                s_center=anatomy.level_s(level) + rng.uniform(-1.5, 1.0),
                s_half=min(6.0, height / 2 + rng.uniform(1.5, 3.5)),
                x_center=rng.uniform(-3, 3), x_half=rng.uniform(4.5, 7),
                depth=rng.uniform(2.0, 6.0), intensity=rng.uniform(0.25, 0.4),
            ))
            anatomy.disc_degeneration[disc] = max(anatomy.disc_degeneration[disc], rng.uniform(0.5, 1.0))
    return lesions


def _occupancy(signed_distance: np.ndarray, edge: float) -> np.ndarray:
    """Fraction of a voxel inside a shape, from its signed distance (negative inside)."""
    return np.clip(0.5 - signed_distance / edge, 0.0, 1.0)


def _paint(image: np.ndarray, occupancy: np.ndarray, value) -> None:
    image += occupancy * (value - image)


def _intersect(distances: list) -> np.ndarray:
    """Signed distance (approximate) to the intersection of shapes: the largest distance."""
    result = np.maximum(distances[0], distances[1])
    for distance in distances[2:]:
        np.maximum(result, distance, out=result)
    return result


def _round_rect_distance(a, b, half_a, half_b, radius):
    """Signed distance to a rectangle with rounded corners centred at the origin."""
    qa = np.abs(a) - (half_a - radius)
    qb = np.abs(b) - (half_b - radius)
    outside = np.sqrt(np.maximum(qa, 0) ** 2 + np.maximum(qb, 0) ** 2)
    inside = np.minimum(np.maximum(qa, qb), 0)
    return outside + inside - radius


def _ellipse_distance(*terms):
    """Approximate signed distance to an ellipse/ellipsoid: terms are (offset, radius) pairs."""
    normalized = np.sqrt(sum((offset / radius) ** 2 for offset, radius in terms))
    smallest = terms[0][1]
    for _, radius in terms[1:]:
        smallest = np.minimum(smallest, radius)
    return (normalized - 1) * smallest


def _capsule_distance(a, b, start, end, radius_start, radius_end):
    """Signed distance to a tapered capsule from start to end in the (a, b) plane."""
    axis = np.array(end) - np.array(start)
    length2 = float(axis @ axis)
    pa, pb = a - start[0], b - start[1]
    t = np.clip((pa * axis[0] + pb * axis[1]) / length2, 0, 1)
    dist = np.hypot(pa - t * axis[0], pb - t * axis[1])
    return dist - (radius_start + t * (radius_end - radius_start))


def _nearest(values: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Index of the nearest centre for each value (centres sorted descending)."""
    ascending = centers[::-1]
    midpoints = (ascending[1:] + ascending[:-1]) / 2
    return len(centers) - 1 - np.searchsorted(midpoints, values)


class _Slab:
    """Flat arrays of curvilinear coordinates (x, s, d) and the image being painted on them."""

    def __init__(self, anatomy: Anatomy, x, s, d, values: dict, edge: float, image: np.ndarray, index=None):
        self.anatomy = anatomy
        self.index = index  # positions in the parent slab (regions only)
        self.x, self.s, self.d = x, s, d
        self.ax = np.abs(x)
        self.values = values
        self.edge = edge
        self.image = image

    def paint(self, signed_distance, tissue, value=None):
        if signed_distance.size == 0 or signed_distance.min() >= self.edge / 2:
            return  # nothing of this structure here
        _paint(self.image, _occupancy(signed_distance, self.edge), self.values[tissue] if value is None else value)

    @contextmanager
    def region(self, keep: np.ndarray):
        """Paint only where `keep` holds: structures that are local cost only their own pixels."""
        index = np.flatnonzero(keep)
        sub = _Slab(self.anatomy, self.x[index], self.s[index], self.d[index], self.values, self.edge,
                    self.image[index], index)
        yield sub
        self.image[index] = sub.image


@dataclass
class _Head:
    """Landmarks of the cranio-cervical junction in (s, d)."""

    dens_d: float
    fm_s: float  # foramen magnum
    basion_d: float
    opisthion_d: float
    skull_center: tuple[float, float]
    skull_radii: tuple[float, float]

    def skull_distance(self, s, d):
        """Approximate signed distance to the inner table of the posterior skull (negative inside)."""
        offset_s, offset_d = s - self.skull_center[0], d - self.skull_center[1]
        normalized = np.sqrt((offset_s / self.skull_radii[0]) ** 2 + (offset_d / self.skull_radii[1]) ** 2)
        return (normalized - 1) * min(self.skull_radii)

    def above_foramen(self, s, d):
        """Signed distance to the plane basion-opisthion (negative above it)."""
        slope = -2.0 / (self.opisthion_d - self.basion_d)
        return (self.fm_s + slope * (d - self.basion_d)) - s

    def clivus_back(self, s):
        return self.basion_d + 4.5 - 0.49 * (s - self.fm_s)


def _head(anatomy: Anatomy) -> _Head:
    dens_d = PVBL - 8.5
    fm_s = anatomy.dens_tip + 5.0
    basion_d = dens_d + 1.5
    opisthion_d = basion_d + 34.0
    return _Head(dens_d, fm_s, basion_d, opisthion_d, (fm_s + 60.0, opisthion_d - 25.0), (75.0, 62.0))


def _profile(s: np.ndarray, anatomy: Anatomy, values: dict[str, float]) -> np.ndarray:
    """Piecewise-linear profile along s through values given at named levels."""
    special = {"top": anatomy.dens_tip + 70, "FM": anatomy.dens_tip + 5, "C1": anatomy.dens_tip - 10,
               "bottom": anatomy.body_bottom[-1] - 40}
    points = sorted((special[level] if level in special else anatomy.level_s(level), value) for level, value in values.items())
    positions, levels = zip(*points)
    return np.interp(s, positions, levels)


def _canal_ap(anatomy: Anatomy, s) -> np.ndarray:
    ap = anatomy.canal_ap
    head = _head(anatomy)
    return _profile(s, anatomy, {
        "FM": head.opisthion_d - PVBL - 1.0, "C1": ap + 6, "C2": ap + 3, "C3": ap + 0.5, "C5-C6": ap - 0.6,
        "C7": ap, "T1": ap - 1.0, "T3": ap - 2.0,
    })


def canal_back_at(anatomy: Anatomy, s) -> np.ndarray:
    """d of the posterior wall of the spinal canal at arc length s."""
    return PVBL + 1.0 + _canal_ap(anatomy, s)


def _anterior_line(anatomy: Anatomy, s) -> np.ndarray:
    """d of the anterior surface of the vertebral column along s."""
    centers = anatomy.body_center_s()[::-1]
    fronts = (PVBL - anatomy.body_depth)[::-1]
    return np.interp(s, centers, fronts)


def _paint_neck(slab: _Slab, head: _Head) -> np.ndarray:
    """Skin, subcutaneous fat, muscles, the airway and the great vessels. Returns where the body is."""
    anatomy, s, d, ax = slab.anatomy, slab.s, slab.d, slab.ax
    front_line = _anterior_line(anatomy, s)
    canal_back = canal_back_at(anatomy, s)
    front = anatomy.neck_front
    front_depth = _profile(s, anatomy, {
        "top": front + 110, "FM": front + 75, "C2": front + 22, "C3": front + 2, "C5": front,
        "C7": front + 6, "T1": front + 14, "T3": front + 30, "bottom": front + 40,
    })
    back_depth = _profile(s, anatomy, {
        "top": 10, "FM": anatomy.neck_back - 20, "C2": anatomy.neck_back - 4, "C4": anatomy.neck_back - 6,
        "C6": anatomy.neck_back, "T1": anatomy.neck_back + 14, "T3": anatomy.neck_back + 24, "bottom": anatomy.neck_back + 28,
    })
    skin_front = front_line - front_depth
    skin_back = canal_back + back_depth
    # above the neck the back of the head follows the skull: bone, then 6 mm of scalp
    skull_s = (s - head.skull_center[0]) / (head.skull_radii[0] + 7)
    skull_back = head.skull_center[1] + (head.skull_radii[1] + 13) * np.sqrt(np.clip(1 - skull_s**2, 0, 1))
    # a soft maximum blends the neck into the back of the head without a notch
    head_rows = np.flatnonzero(s > head.fm_s - 20)
    neck_back, skull_back = skin_back[head_rows], skull_back[head_rows]
    top = np.maximum(neck_back, skull_back)
    skin_back[head_rows] = top + 6.0 * np.log(np.exp((neck_back - top) / 6.0) + np.exp((skull_back - top) / 6.0))
    center = (skin_front + skin_back) / 2
    half_ap = (skin_back - skin_front) / 2
    half_width = anatomy.neck_half_width * _profile(s, anatomy, {"FM": 1.25, "C2": 1.05, "C5": 1.0, "C7": 1.3, "T2": 2.6})
    # superellipse cross-section: flattish front and back, rounded sides
    across, along = ax / half_width, np.abs(d - center) / half_ap
    radius = np.cbrt(across * across * across + along * along * along)
    depth_in = (1 - radius) * np.minimum(half_ap, half_width)
    slab.paint(-depth_in, "skin")
    fat_thickness = np.where(d > center, np.where(s > head.fm_s + 10, 5.0, anatomy.fat_back), anatomy.fat_front)
    slab.paint(1.5 - depth_in, "fat")
    slab.paint(1.5 + fat_thickness - depth_in, "muscle")

    inside = depth_in > -slab.edge
    with slab.region(inside & (d > canal_back + 8) & (s < head.fm_s + 5)) as back:
        # intermuscular fat planes and the nuchal ligament in the posterior neck
        back_canal = canal_back_at(anatomy, back.s)
        back_skin = back_canal + _profile(back.s, anatomy, {
            "FM": anatomy.neck_back - 20, "C2": anatomy.neck_back - 4, "C4": anatomy.neck_back - 6, "C6": anatomy.neck_back,
            "T1": anatomy.neck_back + 14, "T3": anatomy.neck_back + 24, "bottom": anatomy.neck_back + 28,
        }) - anatomy.fat_back
        fraction = (back.d - back_canal) / np.maximum(back_skin - back_canal, 1)
        span = back_skin - back_canal
        for plane, wave in ((0.45, 0.05), (0.72, 0.04)):
            distance = np.abs(fraction - plane - wave * np.sin(back.s / 11.0 + plane * 7)) * span - 0.9
            back.paint(np.maximum(distance, (back.ax - 38) / 3), "fat", back.values["fat"] * 0.85)
        back.paint(np.maximum(np.abs(fraction - 0.88) * span - 1.2, back.ax - 1.5), "ligament")

    with slab.region(inside & (d < PVBL - 4)) as front_part:
        _paint_anterior_neck(front_part, head)
    return inside


def _paint_anterior_neck(slab: _Slab, head: _Head) -> None:
    """Prevertebral tissue, the airway (pharynx, larynx, trachea), thyroid and vessels."""
    anatomy, s, d, x, ax = slab.anatomy, slab.s, slab.d, slab.x, slab.ax
    front_line = _anterior_line(anatomy, s)
    prevertebral = _profile(s, anatomy, {
        "top": 30, "FM": 16, "C2": 4.5, "C3": 4.5, "C4": 6, "C5": 10, "C6": 15, "C7": 16, "T2": 18, "bottom": 20,
    })
    airway_ap = anatomy.airway_ap * _profile(s, anatomy, {"top": 1.2, "FM": 1.0, "C2": 1.0, "C4": 1.1, "C5-C6": 0.55, "C6": 1.0, "T3": 1.05})
    airway_back = front_line - prevertebral
    airway_center = airway_back - airway_ap / 2
    airway_half_width = _profile(s, anatomy, {"top": 14, "C2": 11, "C5": 9, "T1": 8})
    airway = _ellipse_distance((d - airway_center, airway_ap / 2), (x, airway_half_width))
    gland = _ellipse_distance((d - (airway_center - airway_ap / 2 - 7), 6.0), (s - anatomy.level_s("C7"), 14.0), (ax - 9, 8.0))
    slab.paint(gland, "gland")
    slab.paint(airway - 1.5, "mucosa")
    slab.paint(airway, "air")
    # vertebral arteries (flow voids through the transverse foramina), carotids, jugular veins
    lower, upper = anatomy.level_s("C6") - 8, anatomy.body_top[0]
    vertebral = np.hypot(ax - (anatomy.body_half_width + 5), d - (PVBL - 6)) - 2.2
    slab.paint(np.maximum(vertebral, np.maximum(lower - s, s - upper)), "vessel")
    low_neck = anatomy.level_s("T1") - s
    slab.paint(np.maximum(np.hypot(ax - 21, d - (front_line - 14)) - 3.5, low_neck), "vessel")
    slab.paint(np.maximum(np.hypot(ax - 29, d - (front_line - 10)) - 5.0, low_neck), "vein")


def _paint_bone(slab: _Slab, distance, marrow_value=None, cortex=1.0) -> None:
    """A bone: dark cortex of `cortex` mm around marrow."""
    slab.paint(distance, "cortex")
    slab.paint(distance + cortex, "marrow", marrow_value)


def _paint_column(slab: _Slab, head: _Head) -> None:
    """Discs and vertebral bodies C2 to T3."""
    anatomy, s, d, x, ax = slab.anatomy, slab.s, slab.d, slab.x, slab.ax
    values = slab.values
    lateral = np.sqrt(np.clip(1 - np.square(np.square(ax / anatomy.body_half_width)), 0, 1))
    lateral_edge = ax - anatomy.body_half_width

    # disc column: annulus between the bodies, then each nucleus
    disc_centers = anatomy.disc_center_s()
    disc = _nearest(s, disc_centers)
    disc_s = s - disc_centers[disc]
    height = anatomy.disc_height()[disc]
    depth = (anatomy.body_depth[disc] + anatomy.body_depth[disc + 1]) / 2
    bulge = anatomy.disc_bulge[disc] * np.clip(1 - (disc_s / (height / 2 + 1.5)) ** 2, 0, 1)
    front = PVBL - depth - bulge * 0.8
    back = PVBL + bulge
    column = _intersect([front - d, d - back, np.abs(disc_s) - (height / 2 + 4), lateral_edge + 1, s - anatomy.body_top[0]])
    slab.paint(column, "annulus")
    degeneration = anatomy.disc_degeneration[disc]
    nucleus_value = values["nucleus"] * (1 - degeneration) + values["degenerated"] * degeneration
    nucleus = _ellipse_distance(
        (disc_s, np.maximum(height * (0.34 - 0.12 * degeneration), 0.6)),
        (d - (PVBL - 0.45 * depth), 0.3 * depth),
        (x, 0.6 * anatomy.body_half_width),
    )
    slab.paint(nucleus, "nucleus", nucleus_value)

    # vertebral bodies: cortex, marrow, basivertebral vein
    centers = anatomy.body_center_s()
    body = _nearest(s, centers)
    heights = anatomy.body_top - anatomy.body_bottom
    tilt = anatomy.body_tilt[body]
    half_depth = anatomy.body_depth[body] / 2
    along = s - centers[body]
    across = d - (PVBL - half_depth)
    a = along * np.cos(tilt) - across * np.sin(tilt)
    b = along * np.sin(tilt) + across * np.cos(tilt)
    bone = np.maximum(_round_rect_distance(a, b + half_depth * (1 - lateral), heights[body] / 2,
                                           np.maximum(half_depth * lateral, 0.1), 2.0), lateral_edge)
    _paint_bone(slab, bone, values["marrow"] * anatomy.marrow[body])
    vein = _ellipse_distance((along, 2.2), (b - (half_depth - 2.0), 1.6), (x, 3.0))
    slab.paint(vein, "vein", values["csf"] * 0.6)


def _paint_cranio_cervical(slab: _Slab, head: _Head) -> None:
    """Dens, C1, clivus, condyles and the occipital bone."""
    anatomy, s, d, ax = slab.anatomy, slab.s, slab.d, slab.ax
    values = slab.values
    dens = _capsule_distance(s, d, (anatomy.body_top[0] - 4, head.dens_d + 0.5),
                             (anatomy.dens_tip - anatomy.dens_radius, head.dens_d + 2.0),
                             anatomy.dens_radius + 0.8, anatomy.dens_radius)
    _paint_bone(slab, np.maximum(dens, ax - 6.5), values["marrow"] * anatomy.marrow[0])
    c1_s = anatomy.dens_tip - 10
    anterior_arch = _ellipse_distance((s - c1_s, 5.0), (d - (head.dens_d - anatomy.dens_radius - 5.0), 3.4))
    _paint_bone(slab, np.maximum(anterior_arch, ax - 14))
    c1_back = canal_back_at(anatomy, c1_s - 2)
    posterior_arch = _ellipse_distance((s - (c1_s - 2), 4.5), (d - (c1_back + 5.0), 5.0))
    _paint_bone(slab, np.maximum(posterior_arch, ax - 24), cortex=1.2)
    direction = np.array([0.9, -0.44])
    start = np.array([head.fm_s + 1.0, head.basion_d])
    clivus = _capsule_distance(s, d, start, start + 40 * direction, 4.5, 7.5)
    _paint_bone(slab, np.maximum(clivus, ax - 12), cortex=1.2)
    # lateral masses of C1 and occipital condyles (lateral slices)
    lateral_mass = np.maximum(_round_rect_distance(s - (c1_s - 1), d - (head.dens_d + 4), 8.0, 10.0, 3.0), np.abs(ax - 19) - 7)
    _paint_bone(slab, lateral_mass)
    condyle = np.maximum(_round_rect_distance(s - (head.fm_s + 3), d - (head.dens_d + 6), 5.0, 9.0, 3.0), np.abs(ax - 18) - 6)
    _paint_bone(slab, condyle)
    # occipital bone: a 7 mm shell (cortex, diploe, cortex) behind the foramen magnum
    inner = head.skull_distance(s, d)
    shell = _intersect([-inner, inner - 6.0, head.above_foramen(s, d), head.opisthion_d - 1 - d,
                        head.skull_center[1] - 12 - d])
    _paint_bone(slab, shell, values["fat"] * 0.5, cortex=1.8)


def _paint_posterior_elements(slab: _Slab, head: _Head) -> None:
    """Pedicles, articular pillars, laminae, ligamenta flava and spinous processes."""
    anatomy, s, d, ax = slab.anatomy, slab.s, slab.d, slab.ax
    values = slab.values
    canal_back = canal_back_at(anatomy, s)
    centers = anatomy.body_center_s()
    heights = anatomy.body_top - anatomy.body_bottom
    below_c1 = s < anatomy.dens_tip - 16
    wc = anatomy.canal_half_width

    with slab.region(ax > wc - 4) as side:
        # pillars: bone blocks lateral to the canal, facet joints sloping down posteriorly
        s_, d_, ax_ = side.s, side.d, side.ax
        pillar_front, pillar_back = PVBL + 3.0, PVBL + 16.0
        facet_s = s_ + (d_ - (pillar_front + pillar_back) / 2) * np.tan(np.deg2rad(40))
        joints = anatomy.disc_center_s() + 2.0
        joint_distance = np.abs(facet_s - joints[_nearest(facet_s, joints)])
        pillar = _intersect([wc - 0.5 - ax_, ax_ - (wc + 11), pillar_front - d_, d_ - pillar_back,
                                    s_ - (anatomy.body_top[0] + 2)])
        side.paint(pillar, "cortex")
        side.paint(np.maximum(pillar + 1.0, 1.2 - joint_distance), "marrow")
        side.paint(np.maximum(pillar + 0.5, joint_distance - 0.6), "joint")
        # pedicles at mid-body levels; foramina with fat and a nerve root at disc levels
        body = _nearest(s_, centers)
        zone = _intersect([wc - 2.5 - ax_, ax_ - (wc + 6), (PVBL - 1) - d_, d_ - pillar_front, s_ - anatomy.body_top[0]])
        side.paint(zone, "epidural_fat")
        _paint_bone(side, np.maximum(zone, np.abs(s_ - centers[body]) - 0.3 * heights[body]))
        disc_centers = anatomy.disc_center_s()
        root = np.hypot(s_ - disc_centers[_nearest(s_, disc_centers)] - 1.0, d_ - (PVBL + 1.5)) - 1.6
        side.paint(np.maximum(root, zone), "nerve")

    # ligamentum flavum along the back of the canal, laminae over it
    flavum = _intersect([canal_back - d, d - (canal_back + 3.0), ax - (wc + 3)])
    slab.paint(np.where(below_c1, flavum, 10.0), "ligament")
    lamina_centers = centers - 0.3 * heights
    lamina = _nearest(s, lamina_centers)
    lamina_bone = _intersect([np.abs(s - lamina_centers[lamina]) - 0.36 * heights[lamina], canal_back - d,
                                     d - (canal_back + 6.0), ax - (wc + 4)])
    _paint_bone(slab, np.where(below_c1, lamina_bone, 10.0), cortex=1.2)

    with slab.region((ax < 10) & (d > canal_back)) as midline:
        # spinous processes: C2 is big and bifid, C7 and T1 long
        s_, d_ = midline.s, midline.d
        half_width = np.where(s_ > anatomy.body_bottom[0] - 3, 9.0, 5.0)
        for index in range(len(VERTEBRAE)):
            root = (lamina_centers[index], float(canal_back_at(anatomy, lamina_centers[index])) + 3.0)
            length, angle = anatomy.spinous_length[index], anatomy.spinous_angle[index]
            tip = (root[0] - length * np.sin(angle), root[1] + length * np.cos(angle))
            root_radius = 0.36 * heights[index] if index else 7.5
            process = _capsule_distance(s_, d_, root, tip, root_radius, 3.6 if index else 5.5)
            # a knob at the tip, where the muscles insert
            knob = np.hypot(s_ - tip[0], d_ - tip[1]) - (4.2 if index else 6.0)
            process = np.minimum(process, knob)
            _paint_bone(midline, np.maximum(process, midline.ax - half_width),
                        0.85 * values["marrow"] * anatomy.marrow[index], cortex=1.3)


def _paint_canal(slab: _Slab, lesions: list[Lesion], head: _Head) -> list[np.ndarray]:
    """Ligaments, epidural fat, dural sac, cord and brainstem, posterior fossa and the lesions.

    Returns each lesion's occupancy.
    """
    anatomy, s, d, x, ax = slab.anatomy, slab.s, slab.d, slab.x, slab.ax
    values = slab.values
    canal_ap = _canal_ap(anatomy, s)
    canal_front = PVBL + 1.0
    below_foramen = -head.above_foramen(s, d)  # negative below the foramen magnum

    # PLL (tectorial membrane and transverse ligament behind the dens) in front of the canal
    behind_dens = s > anatomy.body_top[0] - 2
    ligament_back = canal_front + np.where(behind_dens, 1.5, 0.4)
    slab.paint(_intersect([canal_front - 1.2 - d, d - ligament_back, ax - anatomy.canal_half_width, below_foramen]), "ligament")
    slab.paint(_intersect([(head.dens_d + anatomy.dens_radius) - d, d - ligament_back, ax - 6,
                                  anatomy.body_top[0] - 2 - s, below_foramen]), "ligament")

    canal_back = canal_front + canal_ap
    slab.paint(_intersect([ligament_back - d, d - canal_back, ax - anatomy.canal_half_width, below_foramen]), "epidural_fat")
    sac_center = (ligament_back + canal_back - 1.2) / 2
    sac_half_ap = (canal_back - 1.2 - ligament_back) / 2
    sac = np.sqrt((ax / anatomy.sac_half_width) ** 2 + ((d - sac_center) / sac_half_ap) ** 2)
    slab.paint(np.maximum((sac - 1) * np.minimum(sac_half_ap, anatomy.sac_half_width), below_foramen - 6), "csf")

    # cord, continuing into the medulla and pons behind the clivus
    cord_half_ap = anatomy.cord_ap / 2 * _profile(s, anatomy, {"top": 3.2, "FM": 1.6, "C1": 1.15, "C2": 1.05, "C5": 1.08, "T1": 0.95})
    cord_half_lr = anatomy.cord_lr / 2 * _profile(s, anatomy, {"top": 2.4, "FM": 1.4, "C2": 0.9, "C5": 1.05, "T1": 0.8})
    ventral_csf = (2 * sac_half_ap - anatomy.cord_ap) * 0.42
    cord_center = ligament_back + ventral_csf + cord_half_ap
    brainstem_center = head.clivus_back(s) + 3.5 + cord_half_ap
    blend = np.clip((s - head.fm_s + 6) / 16, 0, 1)
    cord_center = cord_center * (1 - blend) + brainstem_center * blend

    with slab.region(s > head.fm_s - 12) as fossa:
        _paint_posterior_fossa(fossa, head, (cord_center + cord_half_ap)[fossa.index])

    for lesion in lesions:
        if lesion.kind == "cord_injury" and lesion.swelling:
            swell = 1 + lesion.swelling * np.exp(-(((s - lesion.s_center) / (lesion.s_half * 1.2)) ** 2))
            cord_half_ap = cord_half_ap * swell
            cord_half_lr = cord_half_lr * swell
    shapes = []
    for lesion in lesions:
        if lesion.kind != "herniation":
            shapes.append(None)
            continue
        footprint = 1 - ((s - lesion.s_center) / lesion.s_half) ** 2 - np.square(np.square((x - lesion.x_center) / lesion.x_half))
        tip = PVBL + lesion.depth * np.sqrt(np.clip(footprint, 0, 1))
        shapes.append(_intersect([d - tip, (PVBL - 3.0) - d, -footprint * lesion.s_half]))
        # the herniation pushes the cord back and flattens it
        overlap = np.maximum(tip + 1.0 - (cord_center - cord_half_ap), 0) * (footprint > 0)
        cord_center = cord_center + 0.6 * overlap
        cord_half_ap = np.maximum(cord_half_ap - 0.4 * overlap, 1.5)
    cord = _ellipse_distance((d - cord_center, cord_half_ap), (x, cord_half_lr))
    slab.paint(cord, "cord", values["cord"] * (1 - blend) + values["brain"] * blend)

    occupancies = []
    for lesion, shape in zip(lesions, shapes):
        if lesion.kind == "herniation":
            slab.paint(shape, "herniation", values["csf"] * lesion.intensity)
        else:
            shape = _ellipse_distance(
                (s - lesion.s_center, lesion.s_half),
                (d - cord_center, lesion.depth * cord_half_ap),
                (x - lesion.x_center, lesion.x_half),
            )
            slab.paint(shape, "injury", values["injury"] / CONTRASTS["T2"]["injury"] * lesion.intensity)
            if lesion.hemorrhage:
                core = _ellipse_distance((s - lesion.s_center, lesion.s_half * 0.3), (d - cord_center, 1.2), (x - lesion.x_center, 1.5))
                slab.paint(core, "hemorrhage")
        occupancies.append(_occupancy(shape, slab.edge))
    return occupancies


def _paint_posterior_fossa(slab: _Slab, head: _Head, brainstem_back) -> None:
    """CSF of the posterior fossa, the cerebellum with its folia, the tentorium and the occipital lobes."""
    s, d, ax = slab.s, slab.d, slab.ax
    values = slab.values
    inner = head.skull_distance(s, d)
    # the occipital squama bounds the skull behind and below; in front and above, the brain goes on
    bounded = np.where(d > head.skull_center[1] - 12, inner, -5.0)
    intracranial = _intersect([bounded, head.above_foramen(s, d), head.clivus_back(s) + 1.0 - d])
    tentorium = head.fm_s + 44 - 0.35 * (d - head.opisthion_d)
    slab.paint(np.maximum(intracranial, s - tentorium - 1.0), "csf")
    # cerebellum: behind the brainstem and fourth ventricle, tonsils down to the foramen magnum
    fourth_ventricle = 9.0 * np.clip(1 - np.abs(s - (head.fm_s + 24)) / 9.0, 0, 1)
    tonsil_bottom = head.fm_s + 1.5 + 0.012 * (d - (brainstem_back + 10.0)) ** 2
    cerebellum = _intersect([bounded + 1.5, brainstem_back + 2.5 + fourth_ventricle - d, tonsil_bottom - s,
                             s - tentorium, ax - 48])
    center_s, center_d = head.fm_s + 24, brainstem_back + 20
    angle = np.arctan2(d - center_d, s - center_s)
    radius = np.hypot(s - center_s, d - center_d)
    fissure = np.cos(angle * 15 + radius * 0.35)
    white_matter = np.clip(1 - radius / 9.0, 0, 1) + np.clip(fissure - 0.6, 0, 1) * np.clip(1 - radius / 20, 0, 1)
    sulci = np.clip((fissure - 0.85) * 6, 0, 1) * (radius > 12)
    value = values["cerebellum"] * (1 - 0.3 * white_matter) + (values["csf"] * 0.7 - values["cerebellum"]) * sulci
    slab.paint(cerebellum, "cerebellum", value)
    # above the tentorium: the occipital lobes
    slab.paint(np.maximum(intracranial + 1.0, tentorium + 1.5 - s), "brain")
    slab.paint(_intersect([intracranial, np.abs(s - tentorium - 0.75) - 0.5, brainstem_back + 6 - d]), "ligament")


def render(anatomy: Anatomy, lesions: list[Lesion], points: np.ndarray, contrast: str, edge: float) -> tuple[np.ndarray, list[np.ndarray]]:
    """Noise-free relative signal at LPS `points` (..., 3), and each lesion's occupancy (0..1).

    `edge` is the width (mm) over which boundaries blend, about one pixel.
    """
    shape = points.shape[:-1]
    flat = points.reshape(-1, 3)
    x, s, d = anatomy.to_curvilinear(flat)
    values = dict(CONTRASTS[contrast])
    for tissue, scale in anatomy.tissue_scale.items():
        values[tissue] *= scale
    slab = _Slab(anatomy, x, s, d, values, edge, np.zeros(len(x), dtype=np.float64))
    head = _head(anatomy)

    inside = _paint_neck(slab, head)
    occupancies = [np.zeros(len(x), dtype=np.float32) for _ in lesions]
    with slab.region(inside) as body:
        s, d, ax = body.s, body.d, body.ax
        with body.region((d > PVBL - 40) & (d < PVBL + 6) & (ax < 32) & (s < head.fm_s)) as column:
            _paint_column(column, head)
        with body.region(s > anatomy.body_top[0] - 25) as top:
            _paint_cranio_cervical(top, head)
        with body.region((d > PVBL - 3) & (d < PVBL + 90) & (s < head.fm_s + 5)) as posterior:
            _paint_posterior_elements(posterior, head)
        with body.region(((d > PVBL - 12) & (d < PVBL + 45) & (ax < 16)) | (s > head.fm_s - 12)) as canal:
            for occupancy, local in zip(occupancies, _paint_canal(canal, lesions, head)):
                occupancy[body.index[canal.index]] = local

    # mild tissue texture: a few smooth waves in patient coordinates
    texture = np.zeros(len(x))
    for kx, ky, kz, phase in anatomy.texture_waves:
        texture += np.cos(flat[:, 0] * kx + flat[:, 1] * ky + flat[:, 2] * kz + phase)
    image = slab.image * (1 + 0.03 * texture)
    return image.reshape(shape).astype(np.float32), [o.reshape(shape) for o in occupancies]


def bias_field(anatomy: Anatomy, points: np.ndarray, center: np.ndarray) -> np.ndarray:
    """Smooth receive-coil sensitivity: brighter posteriorly (neck coil), falling off at the FOV ends."""
    offset = (points - center) / 100.0
    linear = offset @ anatomy.bias_gradient
    falloff = -0.35 * offset[..., 2] ** 2 - 0.2 * offset[..., 1] ** 2
    return np.exp(linear + falloff)


def add_rician_noise(rng: np.random.Generator, signal: np.ndarray, sigma: float) -> np.ndarray:
    """Magnitude of the complex signal plus Gaussian noise in both channels."""
    real = signal + rng.normal(0.0, sigma, signal.shape)
    imaginary = rng.normal(0.0, sigma, signal.shape)
    return np.hypot(real, imaginary)
