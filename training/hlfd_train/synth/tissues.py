"""Tissue classes of the synthetic abdomen and their attenuation per contrast phase.

Every range is (low, high) in HU, drawn uniformly per case and tissue, so one case has one
consistent look and the stream covers the published spread. Sources (see
``shared/SYNTH-REFERENCES.md`` for the full citations):

- [P] Prokop 2003 / Buzug 2008 HU table (radclass): liver 45-65, spleen 35-55, kidney 20-40,
  fat -50..-100, cortical bone 700-3000 unenhanced.
- [AJR-HCC] "MDCT of the liver and hypervascular HCCs: optimizing scan delays" (AJR), Radiology
  2007 (PMID 17329690): aorta CEI 300-336 arterial, 117-125 portal venous; liver CEI 15-25
  arterial, 59-63 portal venous; spleen CEI 97-108 / 73-82; portal vein CEI 75-104 arterial.
- [BTCV/FLARE22] portal-venous label medians: liver 124-127, spleen 122, kidney 176-187,
  aorta 130-184, IVC 107-147, pancreas 89-102, stomach 53.
- [Renal] renal MDCT bolus-tracking delays (PMID 17367973): cortex CEI 195-217 at +10-30 s,
  cortex - medulla 110-140 HU corticomedullary; homogeneous nephrogram (medulla CEI ~145)
  from +55 s.
- [SB] biphasic small-bowel enhancement study: wall 118-120 (30 s), 107-111 (60 s).
- [Framingham] visceral fat mean -94 (-106..-79); [vdW] muscle L3 29-50 (van der Werf 2018).
- [Jang] L1 trabecular bone 226 +- 44 (< 30 y) to 89 +- 38 (>= 90 y) (Radiology 2019).
- [Blood] unenhanced aorta / IVC 36-50 (anaemia cohorts; non-anaemic IQR 40-50).
- [Bosniak] simple cyst -9..20, gallbladder/bile 0-20 (FLARE22 median 14).
- [Pickhardt] unenhanced liver 64.4 HU at 0 % fat, under 48 HU specific for >= 30 % fat, under
  40 HU moderate steatosis (Eur Radiol 2012); portal-venous liver under 80-90 HU flags moderate
  steatosis (ARRS 2024 abstract 4710); LiTS liver + tumour voxels 99 +- 39 HU (0.5-99.5th
  percentile -17..201; nnU-Net's LiTS normalisation), darker and wider than a healthy liver.
- "estimate" marks an unsourced starting point, used for randomisation only.
"""

from __future__ import annotations

PHASES = ("non_contrast", "arterial", "portal_venous", "delayed")

# name -> id in the tissue map (uint8); order does not matter, ids are stable.
TISSUES = (
    "air",
    "fat",  # subcutaneous
    "visceral_fat",
    "skin",
    "muscle",
    "cortical_bone",
    "cancellous_bone",
    "disc",
    "csf",
    "lung",
    "heart_blood",
    "myocardium",
    "liver",
    "portal_vein",
    "hepatic_vein",
    "gallbladder",
    "spleen",
    "kidney_cortex",
    "kidney_medulla",
    "renal_pelvis",
    "renal_sinus_fat",
    "aorta",
    "ivc",
    "pancreas",
    "bowel_wall",
    "bowel_fluid",
    "oral_contrast",
    "feces",
    "bladder",
    "adrenal",
    "table",
    "mattress",
    "cyst",
    "liver_tumour",
    "kidney_tumour",
    "metal",
    "ascites",
)
T = {name: i for i, name in enumerate(TISSUES)}
# tissues added after the training stream was fixed take a kin tissue's per-case value instead of
# a draw of their own, so every earlier seed still gives the same case
KIN = {"ascites": "bladder"}  # free fluid is simple water, as urine

# tissue -> (non_contrast, arterial, portal_venous, delayed) ranges
HU: dict[str, tuple[tuple[float, float], ...]] = {
    "air": ((-1000, -990),) * 4,
    "fat": ((-120, -85),) * 4,  # [P], [Framingham]
    "visceral_fat": ((-110, -80),) * 4,  # [Framingham]
    "skin": ((20, 60),) * 4,  # estimate
    "muscle": ((35, 55), (45, 65), (50, 70), (50, 65)),  # [vdW]; mild enhancement estimate
    "cortical_bone": ((450, 1100),) * 4,  # [P] (partial-volumed at 1.5 mm: below 700)
    "cancellous_bone": ((100, 280),) * 4,  # [Jang]
    "disc": ((70, 110),) * 4,  # estimate
    "csf": ((0, 15),) * 4,  # water
    "lung": ((-900, -780),) * 4,  # estimate (lung bases, dependent atelectasis higher)
    "heart_blood": ((35, 50), (250, 400), (140, 200), (110, 150)),  # [AJR-HCC], [Blood]
    "myocardium": ((40, 55), (100, 150), (100, 130), (90, 115)),  # estimate
    "liver": ((45, 65), (65, 90), (95, 135), (85, 115)),  # [P], [AJR-HCC], [BTCV/FLARE22]
    "portal_vein": ((35, 50), (110, 150), (150, 200), (110, 150)),  # [AJR-HCC], BTCV 179
    "hepatic_vein": ((35, 50), (60, 90), (130, 180), (110, 150)),  # [AJR-HCC]
    "gallbladder": ((0, 20),) * 4,  # [Bosniak] bile
    "spleen": ((40, 55), (110, 160), (110, 135), (95, 120)),  # [P], [AJR-HCC], BTCV 122
    "kidney_cortex": ((25, 45), (180, 260), (160, 200), (130, 180)),  # [P], [Renal], BTCV
    "kidney_medulla": ((25, 40), (60, 110), (140, 190), (140, 190)),  # [Renal]
    "renal_pelvis": ((0, 20), (0, 20), (0, 25), (10, 400)),  # estimate; delayed may excrete
    "renal_sinus_fat": ((-110, -60),) * 4,  # fat with vessels: estimate
    "aorta": ((35, 50), (280, 450), (140, 200), (110, 150)),  # [AJR-HCC], [Blood], BTCV 184
    "ivc": ((35, 50), (60, 130), (110, 160), (100, 140)),  # BTCV 147, FLARE22 107; estimate A
    "pancreas": ((35, 50), (100, 140), (80, 110), (70, 90)),  # BTCV 102, FLARE22 89
    "bowel_wall": ((30, 45), (100, 125), (95, 115), (70, 100)),  # [SB]
    "bowel_fluid": ((0, 30),) * 4,  # neutral oral contrast 10-30
    "oral_contrast": ((150, 500),) * 4,  # estimate
    "feces": ((-350, 40),) * 4,  # estimate: air bubbles in stool
    "bladder": ((0, 20),) * 4,  # water
    "adrenal": ((20, 40), (60, 100), (60, 90), (50, 80)),  # estimate
    "table": ((150, 600),) * 4,  # estimate: carbon-fibre shell
    "mattress": ((-950, -700),) * 4,  # estimate: foam
    "cyst": ((-5, 20),) * 4,  # [Bosniak] simple fluid, no enhancement
    "liver_tumour": ((30, 55), (40, 120), (40, 100), (40, 90)),  # overwritten per lesion
    "kidney_tumour": ((25, 45), (100, 220), (80, 160), (60, 120)),  # ccRCC (Urologia J)
    "metal": ((2500, 3071),) * 4,
    "ascites": ((0, 20),) * 4,  # [Bosniak] simple fluid (transudate); the bladder's value
}

# Per-tissue texture amplitude (HU sd of a smooth random field): heterogeneous enhancement.
TEXTURE = {
    "liver": 6.0,
    "spleen": 8.0,
    "kidney_cortex": 8.0,
    "kidney_medulla": 8.0,
    "pancreas": 10.0,
    "muscle": 6.0,
    "fat": 6.0,
    "visceral_fat": 10.0,
    "cancellous_bone": 40.0,
    "cortical_bone": 120.0,
    "lung": 40.0,
    "feces": 150.0,
    "bowel_fluid": 8.0,
    "myocardium": 8.0,
}

# Phase mix of the training stream (portal-venous dominates LiTS; KiTS is late arterial).
PHASE_WEIGHTS = {
    "liver": {"non_contrast": 0.12, "arterial": 0.2, "portal_venous": 0.53, "delayed": 0.15},
    "kidney": {"non_contrast": 0.12, "arterial": 0.35, "portal_venous": 0.4, "delayed": 0.13},
}


def hu_range(tissue: str, phase: str) -> tuple[float, float]:
    """The (low, high) HU range of ``tissue`` in ``phase``."""
    return HU[tissue][PHASES.index(phase)]
